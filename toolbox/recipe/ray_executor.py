"""The `ray` executor: every step instance a Ray task; the parts of a split GGUF and the shards of a safetensors
output one task each.

Ray (`pip install 'corral[ray]'`) is imported only here, only when a run asks for it. The driver
(the process running the recipe) keys the instances and resolves the source as in a local run; it
submits an instance once what it reads is built, with resource requests from the step
(`task_options`), and assembles and publishes the results. Workers build into the content-keyed
cache through the paths the driver hands them, so the cache, the source and the driver's output
directory must be on storage every node sees, under the same path (toolbox.recipe.objects: staged,
then renamed, so a task retried after its node died rebuilds the same bytes and no node ever sees
half an object).

A worker lost mid-task (its node died, it was killed) is retried by Ray up to `MAX_RETRIES` times;
an error raised by the step itself (a CorralError: bad input, a failed gate) is not retried and
comes back to the driver as that error.

A fanned-out step is staged as one directory: each task writes its file (a GGUF part, a safetensors shard)
through a private work directory and renames it in; for safetensors, one more task writes the rest of the
checkpoint (config, tokenizer, license files, index) which the driver moves in after the shards, the index
last; then the directory is sealed as one object, the same bytes a one-process run writes. A task's work
directory is named by the staging directory and the task's part (`work_dir`), so a retry of a killed task
empties the one its first attempt left, and the driver removes any left over once the step is sealed or failed.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

from toolbox.errors import EnvironmentFailure, UsageError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.recipe.executors import Built, Job, build_job
from toolbox.recipe.instances import Instance
from toolbox.recipe.objects import load as load_object
from toolbox.recipe.objects import seal

INSTALL = "pip install 'corral[ray]'"
MAX_RETRIES = 3  # per task, for lost workers and nodes (Ray's max_retries); step errors are never retried
DISK_RESOURCE = "disk_gib"  # a custom resource a cluster may declare per node (GiB of scratch a task may fill)
GIB = 1 << 30
# Peak resident memory a step needs, from the measurements in bench/RESULTS.md (GGUF q8_0 of a Maverick
# layer 1.20 GiB, of a Scout layer 1.43 GiB; ONNX export 0.63 GiB; merge 1.31 GiB; prune 0.55 GiB; expert
# statistics, which prune by criterion and extract auto run first, 3.10 GiB): streamed, so it does not grow
# with the model. Requested with headroom, so that Ray never packs more steps on a node than fit.
PEAK_BYTES = {"convert": 2 * GIB, "merge": 2 * GIB, "prune": 1 * GIB, "extract": 1 * GIB, "verify": 2 * GIB,
              "license-check": GIB // 2}
STATS_PEAK_BYTES = 4 * GIB
# The driver's settings a step reads, given to every task in its runtime_env (blank where the driver has none:
# each reader takes "" for unset, so a node's own environment never changes what a step writes): the stamp and
# reproducibility, direct I/O, where demos and fetched inputs are cached (made absolute), and which Hub a step
# would ask and how patiently. A runtime_env is plain data that Ray keeps in its control store and shows in its
# dashboard and task listings, so no secret is ever put there (SECRET_ENV).
FORWARDED_ENV = ("SOURCE_DATE_EPOCH", "CORRAL_MAU_DECLARATION", "CORRAL_NO_DIRECT_IO", "CORRAL_CACHE_DIR",
                 "HF_ENDPOINT", "CORRAL_HUB_TIMEOUT", "CORRAL_HUB_DEADLINE", "CORRAL_HUB_MAX_FILES",
                 "CORRAL_ACCEPT_LLAMA_LICENSE")
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CORRAL_SIGNING_KEY_PASSWORD")
# steps that need the driver's secrets or network (the Hub token, a signing key's password) run on the driver;
# the source is fetched by the driver too, so no task needs the token. A worker that ever must read a gated
# repository reads its own node's HF_TOKEN (or token file), provisioned as a cluster secret.
DRIVER_OPS = ("publish", "sign")
SHARD_OPS = ("merge", "prune", "extract")  # steps whose safetensors shards fan out (toolbox.recipe.ops.shard_count)
PARTS_SUFFIX = ".parts.partial"  # a fanned-out step's staging directory in the objects directory


class RayMissingError(UsageError):
    """--executor ray without the Python package ray installed (exit 2)."""


class ClusterError(EnvironmentFailure):
    """The Ray cluster cannot be reached, cannot run a step, or lost a task beyond its retries (exit 4)."""


def require_ray() -> None:
    """RayMissingError (exit 2, with the install line) unless ray can be imported."""
    _ray()


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayMissingError("--executor ray needs the Python package 'ray', which is not installed",
                              hint=INSTALL) from None
    return ray


def peak_bytes(job: Job) -> int:
    """The memory a Ray task of this step asks for."""
    p = job.params
    if (job.uses == "prune" and p.get("keep_count") is not None) or (job.uses == "extract" and
                                                                    p.get("expert") == "auto"):
        return STATS_PEAK_BYTES
    return PEAK_BYTES.get(job.uses, 2 * GIB)


def worker_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every task gets (`FORWARDED_ENV` from the driver's, blank where unset); never a secret."""
    env = os.environ if environ is None else environ
    out = {k: env.get(k, "") for k in FORWARDED_ENV}
    if out["CORRAL_CACHE_DIR"]:
        out["CORRAL_CACHE_DIR"] = str(Path(out["CORRAL_CACHE_DIR"]).absolute())
    return out


def task_options(job: Job, estimate: int, cluster: dict[str, float],
                 environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Ray task options: one CPU, the step's peak memory, `disk_gib` only where the cluster declares that
    resource, no GPU (no step uses one yet), bounded retries of lost workers only, and the driver's settings
    (`worker_env`) as the task's runtime_env, so a cluster started by anyone, before this run, sees them."""
    opts: dict[str, Any] = {"num_cpus": 1, "num_gpus": 0, "memory": peak_bytes(job), "max_retries": MAX_RETRIES,
                            "retry_exceptions": False, "runtime_env": {"env_vars": worker_env(environ)}}
    if DISK_RESOURCE in cluster and estimate > 0:
        opts["resources"] = {DISK_RESOURCE: max(1, math.ceil(estimate / GIB))}
    return opts


# -- what runs on the workers ----------------------------------------------------------------------
def _node() -> dict[str, Any]:
    import ray

    return {"executor": "ray", "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}


def remote_build(job: Job) -> Built:
    """A Ray task: build one instance into the shared cache."""
    return build_job(job, NULL_PROGRESS, built_by=_node())


def work_dir(parts_dir: Path, label: str) -> Path:
    """The work directory of one task of a fanned-out step, beside its staging directory `parts_dir`: the same
    for every attempt of that task (a retry starts by emptying what a killed attempt left), unique to the run
    (`parts_dir` is), and matched by `leftover_work_dirs`."""
    return parts_dir.parent / f"{parts_dir.name.removesuffix(PARTS_SUFFIX)}.{label}.partial"


def leftover_work_dirs(parts_dir: Path) -> list[Path]:
    """The work directories tasks of this staging directory left behind (killed mid-write, or never moved)."""
    stem = parts_dir.name.removesuffix(PARTS_SUFFIX)
    return [p for p in parts_dir.parent.glob(f"{stem}.*.partial") if p != parts_dir and p.is_dir()]


def _fresh_work_dir(parts_dir: Path, label: str) -> Path:
    work = work_dir(parts_dir, label)
    shutil.rmtree(work, ignore_errors=True)  # a killed earlier attempt's files
    work.mkdir(parents=True)
    return work


def remote_part(job: Job, part: int, parts_dir: str) -> dict[str, Any]:
    """A Ray task: write part `part` of a split GGUF into `parts_dir` (through its work directory, so a retried
    task replaces the file whole); returns its name, sha256, node and time."""
    from toolbox.convert import convert
    from toolbox.recipe.hashing import HashCache
    from toolbox.recipe.ops import convert_request

    t0 = time.perf_counter()
    target = Path(parts_dir)
    work = _fresh_work_dir(target, f"part{part}")
    try:
        request = replace(convert_request(job.params, Path(job.src), work, job.op_context(NULL_PROGRESS)),
                          parts=(part,))
        (path,) = convert(request).paths
        digest = HashCache(work / ".unused").file(path)
        os.replace(path, target / path.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"part": part, "name": path.name, "sha256": digest, **_node(),
            "seconds": round(time.perf_counter() - t0, 3)}


def remote_shard(job: Job, shard: int | None, staging: str) -> dict[str, Any]:
    """A Ray task: write safetensors shard `shard` of a merge/prune step (None: the rest of the checkpoint) through
    a private work directory; a shard is renamed into `staging`/model, the rest is left for the driver
    (`_place_rest`). Returns the files' sha256, node and time."""
    from toolbox.recipe.hashing import HashCache
    from toolbox.recipe.ops import run_op

    t0 = time.perf_counter()
    target = Path(staging)
    work = _fresh_work_dir(target, "rest" if shard is None else f"shard{shard}")
    params = {**job.params, "shards": [] if shard is None else [shard]}
    try:
        made = run_op(job.uses, params, Path(job.src), work, job.op_context(NULL_PROGRESS))
        assert made is not None
        files = HashCache(work / ".unused").files(made)
        if shard is not None:
            (target / made.name).mkdir(exist_ok=True)
            for name in files:
                os.replace(made / name, target / made.name / name)
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {"part": -1 if shard is None else shard, "files": files, "artifact": made.name, **_node(),
            **({"rest": str(made)} if shard is None else {}), "seconds": round(time.perf_counter() - t0, 3)}


def _place_rest(staging: Path, result: dict[str, Any]) -> None:
    """Move the rest of a sharded checkpoint in beside its shards (the index last) and drop its work directory."""
    from toolbox.tensors.sink import INDEX_NAME

    made = Path(result["rest"])
    for name in sorted(result["files"], key=lambda n: n == INDEX_NAME):
        (staging / result["artifact"] / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(made / name, staging / result["artifact"] / name)
    shutil.rmtree(made.parent, ignore_errors=True)


def split_parts(job: Job) -> int:
    """How many independent part tasks a step fans out to: the files of a split GGUF conversion from HF, the
    safetensors shards of a merge or prune (`toolbox.recipe.ops.shard_count`); 1 for anything else, and for
    `mmproj: auto`, whose second file is written after the text model."""
    p = job.params
    if job.uses in SHARD_OPS:
        from toolbox.recipe.ops import shard_count

        return shard_count(job.uses, p, Path(job.src))
    if job.uses != "convert" or p.get("to") != "gguf" or not p.get("split_max_size") or p.get("mmproj") == "auto":
        return 1
    from toolbox.convert import gguf_part_count, source_format
    from toolbox.recipe.ops import convert_request

    request = convert_request(p, Path(job.src), Path(job.objects), job.op_context(NULL_PROGRESS))
    return gguf_part_count(request) if source_format(request) == "hf" else 1  # other sources: one task


# -- the driver ------------------------------------------------------------------------------------
class _Unit:
    """One instance in flight: its task refs (one, or one per part) and their progress bars."""

    def __init__(self, inst: Instance, job: Job, parts_dir: Path | None) -> None:
        self.inst, self.job, self.parts_dir = inst, job, parts_dir
        self.refs: dict[Any, AbstractContextManager[Any]] = {}
        self.results: list[Any] = []
        self.error: BaseException | None = None
        self.t0 = time.perf_counter()


class RayBackend:
    """Submits instances as Ray tasks and reports finished ones (toolbox.recipe.executors.schedule)."""

    capacity = None  # Ray queues tasks until a node has the resources

    def __init__(self, address: str | None, progress: Progress) -> None:
        self.ray = _ray()
        self.progress = progress
        self.address = address
        self.started = False
        self.units: dict[Any, _Unit] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.driver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-driver-step")
        self.on_driver: dict[Future[Built], Instance] = {}

    def __enter__(self) -> RayBackend:
        ray = self.ray
        if not ray.is_initialized():  # settings reach the tasks through each task's runtime_env (task_options)
            local = self.address is None and not os.environ.get("RAY_ADDRESS")
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False,
                         **({"include_dashboard": False} if local else {}))
            except Exception as exc:  # ConnectionError, an authentication or version mismatch: Ray's own words
                raise ClusterError(f"cannot connect to the Ray cluster at {self.address or 'RAY_ADDRESS'}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                   hint="start it with `ray start --head`, or pass --address HOST:PORT") from None
            self.started = True
        self.remote_build = ray.remote(remote_build)
        self.remote_part = ray.remote(remote_part)
        self.remote_shard = ray.remote(remote_shard)
        self._refresh_nodes()
        return self

    def __exit__(self, *exc: object) -> None:
        self.driver.shutdown(wait=True)
        for unit in self.units.values():
            for bar in unit.refs.values():
                bar.__exit__(None, None, None)
        if self.started:
            self.ray.shutdown()

    def _refresh_nodes(self) -> None:
        self.nodes = {n["NodeID"]: n for n in self.ray.nodes()}

    def _check_feasible(self, job: Job, opts: dict[str, Any]) -> None:
        """A request no live node can ever meet would wait forever: refuse it now."""
        need = {"CPU": opts["num_cpus"], "memory": opts["memory"], **opts.get("resources", {})}

        def fits() -> bool:
            alive = [n["Resources"] for n in self.nodes.values() if n.get("Alive")]
            return any(all(res.get(k, 0) >= v for k, v in need.items()) for res in alive)

        if not fits():
            self._refresh_nodes()  # a node may have joined since
        if not fits():
            raise ClusterError(f"{job.label}: no node of the Ray cluster has "
                               + ", ".join(f"{k} {v / GIB:.1f} GiB" if k == "memory" else f"{k} {v}"
                                           for k, v in need.items()),
                               hint="add a larger node, or declare the resource (ray start --resources)")

    def submit(self, inst: Instance, job: Job) -> None:
        if job.uses in DRIVER_OPS:
            self.on_driver[self.driver.submit(build_job, job, self.progress)] = inst
            return
        opts = task_options(job, inst.estimate, self.ray.cluster_resources())
        self._check_feasible(job, opts)
        count = split_parts(job)
        parts_dir = Path(job.objects) / f".{job.key}.{uuid.uuid4().hex[:8]}{PARTS_SUFFIX}" if count > 1 else None
        unit = _Unit(inst, job, parts_dir)
        if parts_dir is None:
            ref = self.remote_build.options(**opts).remote(job)
            unit.refs[ref] = self._bar(f"{job.label} (ray task)")
        elif job.uses in SHARD_OPS:
            parts_dir.mkdir(parents=True)
            for shard in [*range(count), None]:
                ref = self.remote_shard.options(**opts).remote(job, shard, str(parts_dir))
                what = "rest" if shard is None else f"shard {shard + 1}/{count}"
                unit.refs[ref] = self._bar(f"{job.label} {what} (ray task)")
        else:
            parts_dir.mkdir(parents=True)
            for part in range(count):
                ref = self.remote_part.options(**opts).remote(job, part, str(parts_dir))
                unit.refs[ref] = self._bar(f"{job.label} part {part + 1}/{count} (ray task)")
        for ref in unit.refs:
            self.units[ref] = unit

    def _bar(self, label: str) -> AbstractContextManager[Any]:
        bar = self.progress.task(label, total=None, unit="tasks")
        bar.__enter__()
        return bar

    def wait(self) -> list[tuple[Instance, Built | BaseException]]:
        """Block until at least one instance has all its tasks finished."""
        finished: list[tuple[Instance, Built | BaseException]] = []
        while not finished:
            for fut in [f for f in self.on_driver if f.done()]:
                inst = self.on_driver.pop(fut)
                finished.append((inst, fut.exception() or fut.result()))
            if not self.units:
                if not self.on_driver or finished:
                    break
                wait(self.on_driver, return_when=FIRST_COMPLETED)
                continue
            ready, _ = self.ray.wait(list(self.units), num_returns=1, timeout=0.2 if self.on_driver else None)
            for ref in ready:
                unit = self.units.pop(ref)
                unit.refs.pop(ref).__exit__(None, None, None)
                try:
                    unit.results.append(self.ray.get(ref))
                except Exception as exc:  # the step's own error, or a ClusterError
                    unit.error = unit.error or self._unwrap(unit.job, exc)
                if not unit.refs:
                    finished.append((unit.inst, self._finish(unit)))
        return finished

    def _unwrap(self, job: Job, exc: BaseException) -> BaseException:
        from ray.exceptions import RayTaskError

        if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
            return exc.cause  # the step's own error (a CorralError keeps its exit code and hint)
        return ClusterError(f"{job.label}: the Ray cluster lost the task ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}) after {MAX_RETRIES} retries",
                            hint="check the nodes (ray status); a re-run builds only what is missing")

    def _finish(self, unit: _Unit) -> Built | BaseException:
        if unit.parts_dir is None:
            if unit.error is not None:
                return unit.error
            built: Built = unit.results[0]
            built.built_by = self._describe(built.built_by)
            return built
        try:
            if unit.error is not None:
                return unit.error
            return self._assemble(unit)
        finally:  # sealed (renamed away) or failed: the staging directory and every task's work directory go
            shutil.rmtree(unit.parts_dir, ignore_errors=True)
            for leftover in leftover_work_dirs(unit.parts_dir):
                shutil.rmtree(leftover, ignore_errors=True)

    def _assemble(self, unit: _Unit) -> Built | BaseException:
        """All parts are written: seal them as one object (renamed into place whole, like any other)."""
        assert unit.parts_dir is not None
        parts = sorted(unit.results, key=lambda r: r["part"])
        if unit.job.uses in SHARD_OPS:  # shards in place; the rest (config, license files, index) goes in last
            _place_rest(unit.parts_dir, parts[0])
            parts = [*parts[1:], parts[0]]
            files = {k: v for r in parts for k, v in r["files"].items()}
            first = unit.parts_dir / parts[0]["artifact"]
        else:
            files = {r["name"]: r["sha256"] for r in parts}
            first = unit.parts_dir / parts[0]["name"]
        omit = ("sha256", "files", "rest", "artifact")
        built_by = {"executor": "ray", "seconds": round(time.perf_counter() - unit.t0, 3),
                    "parts": [self._describe({k: v for k, v in r.items() if k not in omit}) for r in parts]}
        seal(unit.parts_dir, Path(unit.job.objects) / unit.job.key, first, files, unit.job.label, built_by)
        done = load_object(Path(unit.job.objects), unit.job.key, False)
        if done is None:
            return ClusterError(f"{unit.job.label}: the assembled object is missing from the cache")
        return Built(done[0], done[1], done[2] or built_by)

    def _describe(self, who: dict[str, Any]) -> dict[str, Any]:
        """The builder's record plus its node's custom resources (how a cluster names its nodes)."""
        node_id = who.get("node_id")
        if node_id and node_id not in self.nodes:
            self._refresh_nodes()
        res = self.nodes.get(node_id or "", {}).get("Resources", {})
        custom = sorted(k for k in res if k not in ("CPU", "GPU", "memory", "object_store_memory")
                        and not k.startswith(("node:", "accelerator_type:")))
        return {**who, "resources": custom}
