"""Iterate in a background thread a few items ahead: reading and encoding overlap writing."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate `items` in a background thread, `depth` items ahead.

    Reading and transposing the next piece (preadv, torch: both release the GIL) then overlaps
    with writing the current one; memory stays at `depth` + 2 pieces. An exception in the
    producer is raised here; stopping early (an exception in the consumer) stops the producer.
    """
    import queue
    import threading

    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((None, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((None, done))
        except BaseException as exc:  # handed to the consumer
            q.put((exc, None))

    worker = threading.Thread(target=produce, name="corral-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            exc, item = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.1)
