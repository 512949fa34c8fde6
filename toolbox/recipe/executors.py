"""Where a recipe's step instances run: threads on this machine (`local`, the default) or tasks on a
Ray cluster (`ray`, toolbox.recipe.ray_executor), behind one small interface.

The run (toolbox.recipe.run) keys the instances and decides what is cached; an executor only builds
the rest, each instance once its input (and the instance a verify step compares with) is built,
and stops starting new ones after the first failure. What a builder needs travels as a `Job` of
plain data (paths, parameters, the cache directory), so that a process on another node that sees
the same storage can build it; `build_job` is that builder, wherever it runs.

Which executor: `--executor` (or `run_recipe(executor=...)`), else `$CORRAL_EXECUTOR` (also the
`executor` setting), else the recipe's `executor:`, else `local`.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from toolbox.errors import UsageError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.recipe.instances import Instance
from toolbox.recipe.objects import artifact_files, mark_gate, seal
from toolbox.recipe.objects import load as load_object
from toolbox.recipe.ops import OpContext, run_op

EXECUTORS = ("local", "ray")
ENV = "CORRAL_EXECUTOR"


@dataclass(frozen=True)
class Job:
    """Everything a builder needs for one step instance, as plain data (it may travel to another node)."""

    uses: str
    params: dict[str, Any]
    key: str
    label: str
    gate: bool
    src: str  # the input checkpoint (the source or the parent's artifact), on storage every builder sees
    against: str | None  # what a verify step compares with
    objects: str  # <cache>/objects
    context: dict[str, Any]  # OpContext fields: mau_declaration, fix_name

    def op_context(self, progress: Progress) -> OpContext:
        against = Path(self.against) if self.against else None
        return OpContext(progress=progress, resolve=lambda _target: against, **self.context)


@dataclass
class Built:
    """What a builder reports: the artifact, its files' sha256, and who built it how fast."""

    artifact: Path
    files: dict[str, str]
    built_by: dict[str, Any] = field(default_factory=dict)


def build_job(job: Job, progress: Progress = NULL_PROGRESS, built_by: dict[str, Any] | None = None) -> Built:
    """Build one instance into the cache: a gate checks and leaves its marker; anything else is built in a
    staging directory and renamed into `objects/<key>` (nothing half-built is ever visible there)."""
    t0 = time.perf_counter()
    objects = Path(job.objects)
    who = {**(built_by or local_node()), "seconds": 0.0}
    if job.gate:
        run_op(job.uses, job.params, Path(job.src), objects, job.op_context(progress))
        mark_gate(objects, job.key, job.label)
        who["seconds"] = round(time.perf_counter() - t0, 3)
        return Built(objects, {}, who)
    staging = objects / f".{job.key}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir(parents=True)
    try:
        artifact = run_op(job.uses, job.params, Path(job.src), staging, job.op_context(progress))
        assert artifact is not None
        files = artifact_files(artifact)
        who["seconds"] = round(time.perf_counter() - t0, 3)
        seal(staging, objects / job.key, artifact, files, job.label, who)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    done = load_object(objects, job.key, False)
    assert done is not None
    return Built(done[0], done[1], done[2] or who)


def local_node() -> dict[str, Any]:
    return {"executor": "local", "hostname": socket.gethostname()}


# -- the scheduling loop, shared by the executors ------------------------------------------------------
class Backend(Protocol):
    """Starts builds and reports finished ones; `capacity` bounds how many run at once (None: the cluster's
    scheduler queues them)."""

    capacity: int | None

    def submit(self, inst: Instance, job: Job) -> None: ...

    def wait(self) -> list[tuple[Instance, Built | BaseException]]: ...


def schedule(todo: list[Instance], deps: Callable[[Instance], list[Instance]], make_job: Callable[[Instance], Job],
             backend: Backend) -> None:
    """Start each instance once its dependencies are built; after a failure start nothing more, let what
    runs finish, and mark the rest skipped. Statuses and results land on the instances."""
    pending = list(todo)
    running: set[int] = set()
    stop = False
    while pending or running:
        if not stop:
            for inst in list(pending):
                ready = all(d.status in ("cached", "built") for d in deps(inst))
                if ready and (backend.capacity is None or len(running) < backend.capacity) and not stop:
                    pending.remove(inst)
                    try:
                        backend.submit(inst, make_job(inst))
                    except Exception as exc:  # refused before it started (a cluster no node of which fits it)
                        inst.status, inst.error, stop = "failed", str(exc), True
                        inst.exc = exc  # type: ignore[attr-defined]
                        continue
                    inst.status = "running"
                    running.add(id(inst))
        if not running:
            break
        for inst, outcome in backend.wait():
            running.discard(id(inst))
            if isinstance(outcome, BaseException):
                inst.status, inst.error = "failed", str(outcome)
                inst.exc = outcome  # type: ignore[attr-defined]
                stop = True
            else:
                inst.status = "built"
                inst.artifact, inst.files = outcome.artifact, outcome.files
                inst.built_by = outcome.built_by
                inst.seconds = float(outcome.built_by.get("seconds", 0.0))
    for inst in pending:
        inst.status = "skipped"


class LocalBackend:
    """Threads in this process (the builds are I/O- and kernel-bound and release the GIL)."""

    def __init__(self, jobs: int, progress: Progress) -> None:
        self.capacity = jobs
        self.progress = progress
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="corral-recipe")
        self.futures: dict[Future[Built], Instance] = {}

    def submit(self, inst: Instance, job: Job) -> None:
        self.futures[self.pool.submit(build_job, job, self.progress)] = inst

    def wait(self) -> list[tuple[Instance, Built | BaseException]]:
        done, _ = wait(self.futures, return_when=FIRST_COMPLETED)
        out: list[tuple[Instance, Built | BaseException]] = []
        for fut in done:
            inst = self.futures.pop(fut)
            exc = fut.exception()
            out.append((inst, exc if exc is not None else fut.result()))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def run_local(todo: list[Instance], deps: Callable[[Instance], list[Instance]],
              make_job: Callable[[Instance], Job], *, jobs: int, progress: Progress) -> None:
    """Build `todo` in `jobs` threads of this process."""
    backend = LocalBackend(jobs, progress)
    try:
        schedule(todo, deps, make_job, backend)
    finally:
        backend.close()


def choose(executor: str | None, recipe_executor: str | None) -> str:
    """The executor's name: the argument, else $CORRAL_EXECUTOR, else the recipe's, else local."""
    name = (executor or os.environ.get(ENV) or recipe_executor or "local").strip().lower()
    if name not in EXECUTORS:
        raise UsageError(f"unknown executor {name!r}", hint=f"use one of {', '.join(EXECUTORS)} (--executor, "
                         f"${ENV} or the recipe's executor:)")
    return name
