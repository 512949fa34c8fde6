"""Running a recipe: expand the matrix, key every step by its inputs, build what is not cached (in
parallel where independent), check the gates, publish the outputs, keep the lock.

Every step instance's key is a hash of the operation, its parameters, the keys of what it reads
(the source's content or Hub commit, adapter and calibration file contents), the license
declarations and corral's version. A built instance lives in `<cache>/objects/<key>/`, so a
re-run skips it, and a CI job that only adds a quant type builds only that one. Outputs are
hard links to the cache objects (read-only) where the filesystem allows, copies otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolbox.errors import BadInputError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.recipe.check import check_instances, count_instances
from toolbox.recipe.hashing import HashCache, digest_of
from toolbox.recipe.instances import Instance, against_target, expand_steps
from toolbox.recipe.load import LoadedRecipe
from toolbox.recipe.objects import MMPROJ_SUFFIX, artifact_parts
from toolbox.recipe.objects import load as load_object
from toolbox.recipe.ops import is_step_ref

LOCK_VERSION = 1
RECORD_NAME = "corral-recipe.json"
# bits per weight of each GGUF outtype, for the dry run's disk estimate (bf16 source = 16)
_BITS = {"f32": 32, "f16": 16, "bf16": 16, "auto": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.5,
         "q5_0": 5.5, "q5_1": 6, "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_0": 4.5, "q4_1": 5, "iq4_xs": 4.3, "iq4_nl": 4.5,
         "mxfp4": 4.3, "q3_k_m": 3.9, "q3_k_s": 3.5, "q3_k_l": 4.3, "iq3_m": 3.7, "iq3_xxs": 3.1, "q2_k": 2.6,
         "iq2_m": 2.7, "tq2_0": 2.1, "tq1_0": 1.7}


class ReproducibilityError(BadInputError):
    """A step rebuilt under a lock produced different bytes than the lock records."""


@dataclass
class RecipeResult:
    name: str
    recipe: Path
    output_dir: Path
    cache_dir: Path
    source: dict[str, Any]
    instances: list[Instance]
    dry_run: bool
    lock: Path | None
    published: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return all(i.status in ("cached", "built", "planned") for i in self.instances)

    @property
    def work_done(self) -> int:
        return sum(1 for i in self.instances if i.status == "built")

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.name, "file": str(self.recipe), "ok": self.ok, "dry_run": self.dry_run,
                "output_dir": str(self.output_dir), "cache_dir": str(self.cache_dir), "source": self.source,
                "built": self.work_done, "cached": sum(1 for i in self.instances if i.status == "cached"),
                "estimated_bytes": sum(i.estimate for i in self.instances if i.status == "planned"),
                "steps": [i.to_dict(self.output_dir) for i in self.instances], "published": self.published,
                "lock": str(self.lock) if self.lock else None}


# -- expansion -----------------------------------------------------------------------------------
def expand(loaded: LoadedRecipe) -> list[Instance]:
    """Step instances in dependency order, checked (`toolbox.recipe.check`): what a run would refuse is refused
    here, before anything is built."""
    count_instances(loaded)
    out = expand_steps(loaded)
    check_instances(loaded, out)
    return out


# -- the source ----------------------------------------------------------------------------------
@dataclass
class Source:
    spec: str
    path: Path | None
    key: str
    info: dict[str, Any]
    size: int


def resolve_source(loaded: LoadedRecipe, cache: Path, hashes: HashCache, *, dry_run: bool, lock: dict[str, Any] | None,
                   accept_license: bool, progress: Progress) -> Source:
    r = loaded.recipe
    spec = r.source
    if spec.startswith("demo:"):
        from toolbox.demo import DEMO_FORMAT_VERSION  # the demo's format goes into the step keys
        from toolbox.reference import resolve_path

        path = resolve_path(spec, progress)
        info = {"kind": "demo", "spec": spec, "format_version": DEMO_FORMAT_VERSION}
        return Source(spec, path, digest_of(info), info, _weights_size(path))
    local = Path(spec).expanduser()
    if not local.is_absolute():
        local = (loaded.path.parent / local) if (loaded.path.parent / local).exists() else local
    if local.exists():
        files = hashes.files(local)
        info = {"kind": "path", "spec": spec, "sha256": digest_of(files)}
        if lock and lock.get("source", {}).get("sha256") not in (None, info["sha256"]):
            raise BadInputError(f"source {spec} changed since the lock was written (content hash differs)",
                                hint="restore the locked input, or delete the lock file to re-lock")
        return Source(spec, local.absolute(), info["sha256"], info, _weights_size(local))
    if "/" not in spec or spec.startswith((".", "/")):
        raise BadInputError(f"source {spec!r} is neither a path that exists, a demo:* name nor a Hub repo id")
    from toolbox.hub.client import download

    revision = (lock or {}).get("source", {}).get("commit") or r.revision
    target = cache / "hub" / spec.replace("/", "--")
    res = download(spec, target, revision=revision, include=r.include or None, dry_run=dry_run,
                   accept_license=accept_license, progress=progress)
    info = {"kind": "hub", "spec": spec, "revision": r.revision or "main", "commit": res.commit,
            "include": r.include}
    return Source(spec, None if dry_run else target, digest_of(info), info, res.bytes_total)


def _weights_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- keys and estimates --------------------------------------------------------------------------
def _key(inst: Instance, source: Source, against: Instance | str | None, loaded: LoadedRecipe, hashes: HashCache,
         inputs: dict[str, str], license_spec: dict[str, Any]) -> str:
    from toolbox import __version__

    params = dict(inst.params)
    for name in ("calibration", "imatrix", "key", "public_key", "base"):
        if params.get(name) and not str(params[name]).startswith("demo:") and not (  # a demo base: its name is its key
                name == "imatrix" and is_step_ref(params[name])):  # an imatrix step: its key is `against` below
            params[name] = _input_hash(loaded, params[name], hashes, inputs)
    if "adapters" in params:
        params["adapters"] = [{**a, "path": _input_hash(loaded, a["path"], hashes, inputs)} for a in params["adapters"]]
    if params.get("models"):  # a weight merge's fine-tuned inputs (a demo: name is its own key)
        params["models"] = [{**m, "path": m["path"] if m["path"].startswith("demo:")
                             else _input_hash(loaded, m["path"], hashes, inputs)} for m in params["models"]]
    return digest_of({
        "uses": inst.step.uses, "params": params, "input": inst.parent.key if inst.parent else source.key,
        "against": None if against == "none" else (against.key if isinstance(against, Instance) else source.key),
        "license": license_spec, "corral": __version__,
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH"),
    })


def _input_path(loaded: LoadedRecipe, spec: str) -> Path:
    p = Path(spec).expanduser()
    if not p.is_absolute() and (loaded.path.parent / p).exists():
        p = loaded.path.parent / p
    if not p.exists():
        raise BadInputError(f"recipe input {spec} does not exist", path=p,
                            hint="paths in a recipe are relative to the recipe file or the working directory")
    return p.absolute()


def _input_hash(loaded: LoadedRecipe, spec: str, hashes: HashCache, inputs: dict[str, str]) -> str:
    if spec not in inputs:
        inputs[spec] = hashes.tree(_input_path(loaded, spec))
    return inputs[spec]


def _estimate(inst: Instance, parent_size: int) -> int:
    if inst.gate:
        return 0
    p = inst.params
    if inst.step.uses == "convert":
        if p["to"] == "gguf":
            return int(parent_size * _BITS.get(str(p.get("outtype", "auto")).lower(), 16) / 16)
        return parent_size * (2 if p.get("dtype") in ("f32", "fp32") or (p["to"] == "onnx" and p.get("dtype")
                                                                          in (None, "auto")) else 1)
    return parent_size  # merge, prune, extract: at most the input's size


# -- the run -------------------------------------------------------------------------------------
def run_recipe(loaded: LoadedRecipe, output_dir: str | Path | None = None, *, cache_dir: str | Path | None = None,
               dry_run: bool = False, lock: str | Path | None = None, jobs: int | None = None,
               accept_license: bool = False, mau_declaration: str | None = None,
               executor: str | None = None, address: str | None = None,
               progress: Progress = NULL_PROGRESS) -> RecipeResult:
    """Run (or with `dry_run`, plan) a recipe. Raises GateFailed (exit 1) when a gate finds problems,
    the step's own CorralError when a step fails, ReproducibilityError when a lock is not met.

    `executor` "local" (threads, the default) or "ray" (tasks on the Ray cluster at `address`: "auto",
    HOST:PORT or ray://HOST:PORT; default $RAY_ADDRESS, else a new Ray instance on this machine); see
    toolbox.recipe.executors for the precedence and toolbox.recipe.ray_executor for what a cluster needs."""
    from toolbox.demo import cache_dir as default_cache
    from toolbox.recipe.executors import choose

    r = loaded.recipe
    executor = choose(executor, r.executor)
    if executor == "ray" and not dry_run:
        from toolbox.recipe.ray_executor import require_ray

        require_ray()  # a missing extra is exit 2 before the source is fetched
    out_dir = Path(output_dir) if output_dir else Path(r.name)
    cache = Path(cache_dir) if cache_dir else default_cache() / "recipes"
    hashes = HashCache(cache / "hashes.json")
    lock_path = Path(lock) if lock else None
    lock_doc = _read_lock(lock_path) if lock_path and lock_path.is_file() else None
    instances = expand(loaded)  # refuses what a run would refuse, before the source is fetched or built
    source = resolve_source(loaded, cache, hashes, dry_run=dry_run, lock=lock_doc, accept_license=accept_license,
                            progress=progress)
    # the declaration the outputs will carry: --mau-declaration / CORRAL_MAU_DECLARATION, else the recipe's
    ctx_common = {"mau_declaration": mau_declaration or r.license.mau_declaration, "fix_name": r.license.fix_name}
    inputs: dict[str, str] = {}
    against_of: dict[int, Instance | str | None] = {}
    sizes: dict[int, int] = {}
    for inst in instances:
        against_of[id(inst)] = against_target(inst, instances)
        inst.key = _key(inst, source, against_of[id(inst)], loaded, hashes, inputs, ctx_common)
        parent_size = sizes[id(inst.parent)] if inst.parent else source.size
        sizes[id(inst)] = _estimate(inst, parent_size) if not inst.gate else parent_size
        inst.estimate = 0 if inst.gate else sizes[id(inst)]
    for inst in instances:  # ops get absolute paths (recipe paths are relative to the recipe file)
        for name in ("calibration", "imatrix", "key", "public_key", "base"):
            if inst.params.get(name) and not str(inst.params[name]).startswith("demo:") and not (
                    name == "imatrix" and is_step_ref(inst.params[name])):
                inst.params[name] = str(_input_path(loaded, inst.params[name]))
        if "adapters" in inst.params:
            inst.params["adapters"] = [{**a, "path": str(_input_path(loaded, a["path"]))}
                                       for a in inst.params["adapters"]]
        if inst.params.get("models"):
            inst.params["models"] = [{**m, "path": m["path"] if m["path"].startswith("demo:")
                                      else str(_input_path(loaded, m["path"]))} for m in inst.params["models"]]
    if lock_doc:
        for spec, digest in inputs.items():
            locked = lock_doc.get("inputs", {}).get(spec)
            if locked is not None and locked != digest:
                raise BadInputError(f"recipe input {spec} changed since the lock was written",
                                    hint="restore the locked input, or delete the lock file to re-lock")
    objects = cache / "objects"
    for inst in instances:
        done = load_object(objects, inst.key, inst.gate)
        if done is not None:
            inst.status, inst.artifact, inst.files, inst.built_by = "cached", *done
        elif dry_run:
            inst.status = "planned"
    hashes.save()
    result = RecipeResult(r.name, loaded.path, out_dir, cache, source.info, instances, dry_run, lock_path, [])
    if dry_run:
        return result
    assert source.path is not None
    _execute(instances, source, against_of, objects, ctx_common, progress, jobs=jobs, executor=executor,
             address=address)
    failed = next((i for i in instances if i.status == "failed"), None)
    if failed is not None:
        raise failed.exc  # type: ignore[attr-defined]
    if lock_doc:
        _check_lock(lock_doc, instances)
    result.published = _publish(instances, out_dir, r.name, loaded, source)
    if lock_path is not None:
        _write_lock(lock_path, loaded, source, inputs, instances, lock_doc)
    return result


def _execute(instances: list[Instance], source: Source, against_of: dict[int, Any], objects: Path,
             ctx_common: dict[str, Any], progress: Progress, *, jobs: int | None, executor: str,
             address: str | None) -> None:
    """Build what is not cached, each instance after what it reads (toolbox.recipe.executors)."""
    from toolbox.recipe.executors import Job, run_local, schedule

    todo = [i for i in instances if i.status == "pending"]
    if not todo:
        return

    def path_of(target: Instance | None) -> str:
        return str(source.path if target is None else target.artifact)

    def deps(inst: Instance) -> list[Instance]:
        ag = against_of[id(inst)]
        gates = [g for g in todo if g.gate and g.step.uses != "publish"] if inst.step.uses == "publish" else []
        return [d for d in (inst.parent, ag, *gates) if isinstance(d, Instance)]  # publish: after every gate

    def make_job(inst: Instance) -> Job:
        ag = against_of[id(inst)]
        return Job(inst.step.uses, inst.params, inst.key, inst.label, inst.gate, path_of(inst.parent),
                   None if ag == "none" else path_of(ag), str(objects), dict(ctx_common))

    if executor == "ray":
        from toolbox.recipe.ray_executor import RayBackend

        with RayBackend(address, progress) as backend:
            schedule(todo, deps, make_job, backend)
    else:
        run_local(todo, deps, make_job, jobs=jobs or default_jobs(), progress=progress)


def default_jobs() -> int:
    """Parallel steps: one per 2 cores and per 4 GiB of available memory (each step peaks near 1-2 GiB)."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024
    except (OSError, StopIteration, ValueError):
        avail = 8 << 30
    return max(1, min(4, cores // 2 or 1, avail // (4 << 30)))


# -- publishing ----------------------------------------------------------------------------------
def _published_name(part: Path, first: Path, target: Path) -> Path:
    """`X.gguf` for a single file; `X-0000i-of-0000N.gguf` for the parts of a split set."""
    from toolbox.tensors.gguf.reader import SPLIT_RE

    if part.name.endswith(MMPROJ_SUFFIX) and part != first:
        return target.with_name(f"{target.name.removesuffix('.gguf')}{MMPROJ_SUFFIX}")
    m = SPLIT_RE.match(part.name)
    if m is None or SPLIT_RE.match(first.name) is None:
        return target
    return target.with_name(f"{target.name.removesuffix('.gguf')}-{m['i']}-of-{m['n']}.gguf")


RECORD_MAX_BYTES = 16 * 1024**2


def _previous_outputs(out_dir: Path) -> set[str]:
    """The paths (relative to out_dir) that the last run published there, from its corral-recipe.json; only
    these may be removed as stale, so a file corral did not publish is never touched. A missing, oversized or
    damaged record names nothing (nothing is removed)."""
    from toolbox.tensors.atomic import safe_join

    try:
        with open(out_dir / RECORD_NAME, "rb") as f:
            raw = f.read(RECORD_MAX_BYTES + 1)
        outputs = json.loads(raw)["outputs"] if len(raw) <= RECORD_MAX_BYTES else []
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    names: set[str] = set()
    for entry in outputs if isinstance(outputs, list) else []:
        files = entry.get("published_files") or [entry.get("path")] if isinstance(entry, dict) else []
        for rel in files:
            try:
                if isinstance(rel, str) and rel and rel != RECORD_NAME:
                    names.add(os.path.relpath(safe_join(out_dir, rel), out_dir.resolve()))
            except BadInputError:
                continue  # a hand-edited record pointing outside the directory: ignored
    return {n for n in names if n != "."}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _publish(instances: list[Instance], out_dir: Path, name: str, loaded: LoadedRecipe,
             source: Source) -> list[dict[str, Any]]:
    """Put each output in place atomically (hard links to the cache objects); record the run."""
    from toolbox.tensors.atomic import atomic_file, safe_join

    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_outputs(out_dir)
    published = []
    for inst in instances:
        if not inst.output or inst.artifact is None:
            continue
        target = safe_join(out_dir, inst.output)
        target.parent.mkdir(parents=True, exist_ok=True)
        art = inst.artifact
        pairs = [(art, target)] if art.is_dir() else [(p, _published_name(p, art, target)) for p in
                                                      artifact_parts(art)]
        same = all(dst.exists() and src.is_file() and dst.is_file() and os.path.samefile(src, dst)
                   for src, dst in pairs)
        if not same:
            for src, dst in sorted(pairs, key=lambda pair: pair[0] == art):  # the first part lands last
                staging = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.partial"
                if src.is_dir():
                    shutil.copytree(src, staging, copy_function=_link_or_copy)
                else:
                    _link_or_copy(src, staging)
                if dst.is_dir() and not dst.is_symlink():
                    old = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.old"
                    os.replace(dst, old)
                    os.replace(staging, dst)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(staging, dst)
        published.append({"step": inst.label, "path": str(dict(pairs)[art]), "files": inst.files,
                          "status": "unchanged" if same else "written", "built_by": inst.built_by,
                          "published_files": [os.path.relpath(dst, out_dir.resolve()) for _src, dst in pairs]})
    current = {f for p in published for f in p["published_files"]}
    for stale in sorted(previous - current):  # what an earlier run published and this one no longer does
        path = out_dir / stale
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        published.append({"step": None, "path": str(path), "files": {}, "status": "removed", "published_files": []})
    record = {"recipe": name, "recipe_sha256": loaded.digest, "source": source.info,
              "outputs": [{"step": p["step"], "path": os.path.relpath(p["path"], out_dir), "files": p["files"],
                           "published_files": p["published_files"], "built_by": p["built_by"]}
                          for p in published if p["status"] != "removed"],
              # which node built each object (gates included) and how long it took; for a cached one, its builder
              "steps": [{"step": i.label, "key": i.key, "status": i.status, "built_by": i.built_by}
                        for i in instances]}
    with atomic_file(out_dir / RECORD_NAME, force=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return published


# -- lock ----------------------------------------------------------------------------------------
LOCK_MAX_BYTES = 64 * 1024**2


def _read_lock(path: Path) -> dict[str, Any]:
    """The lock document, its shape checked (a lock file is an input: it may be damaged or hand-edited)."""
    from toolbox.tensors.jsonio import load_json

    doc = load_json(path, max_bytes=LOCK_MAX_BYTES, what=f"{path}: lock file", error=BadInputError)
    if not isinstance(doc, dict) or doc.get("corral_lock") != LOCK_VERSION:
        raise BadInputError(f"{path}: not a corral recipe lock (version {LOCK_VERSION})", path=path)
    steps = doc.get("steps", {})
    shapes = {"source": isinstance(doc.get("source", {}), dict),
              "inputs": isinstance(doc.get("inputs", {}), dict)
              and all(isinstance(v, str) for v in doc.get("inputs", {}).values()),
              "steps": isinstance(steps, dict) and all(
                  isinstance(v, dict) and isinstance(v.get("key", ""), str) and isinstance(v.get("files", {}), dict)
                  for v in steps.values())}
    bad = next((k for k, ok in shapes.items() if not ok), None)
    if bad is not None:
        raise BadInputError(f"{path}: lock file field {bad!r} has the wrong shape",
                            hint="delete the lock file to re-lock", path=path)
    return doc


def _check_lock(lock_doc: dict[str, Any], instances: list[Instance]) -> None:
    locked = lock_doc.get("steps", {})
    for inst in instances:
        entry = locked.get(inst.label)
        if entry and entry.get("key") == inst.key and not inst.gate and entry.get("files") != inst.files:
            diff = sorted(k for k in set(entry["files"]) | set(inst.files)
                          if entry["files"].get(k) != inst.files.get(k))
            raise ReproducibilityError(f"{inst.label}: rebuilt output differs from the lock ({', '.join(diff[:3])})",
                                       hint="the step is not deterministic on this machine; report it")


def _write_lock(path: Path, loaded: LoadedRecipe, source: Source, inputs: dict[str, str], instances: list[Instance],
                old: dict[str, Any] | None) -> None:
    from toolbox import __version__
    from toolbox.tensors.atomic import atomic_file

    steps = dict((old or {}).get("steps", {}))
    for inst in instances:
        if not inst.gate:
            steps[inst.label] = {"key": inst.key, "files": inst.files}
    doc = {"corral_lock": LOCK_VERSION, "recipe": loaded.recipe.name, "recipe_sha256": loaded.digest,
           "corral_version": __version__, "source": source.info, "inputs": {**(old or {}).get("inputs", {}), **inputs},
           "steps": dict(sorted(steps.items()))}
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")

