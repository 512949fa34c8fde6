"""Iterate in a background thread a few items ahead: reading and encoding overlap writing."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate `items` in a background thread, `depth` items ahead.

    Reading and encoding the next piece (preadv, ggml, numpy: all release the GIL) then overlaps
    with writing the current one; memory stays at `depth` + 2 pieces. Stages chain: the items may
    themselves come from a prefetch (read -> encode -> write, each stage in its own thread). An
    exception in the producer is raised here; stopping early (an exception in the consumer) stops
    the producer, and the producer closes `items`, which stops the stage before it.
    """
    import queue
    import threading

    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    it = iter(items)

    def produce() -> None:
        try:
            for item in it:
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
        finally:  # an inner stage (a prefetch of its own) stops here, in the thread that ran it
            close = getattr(it, "close", None)
            if close is not None:
                close()

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
