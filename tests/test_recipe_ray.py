"""Recipes on a real two-node Ray cluster (both nodes on 127.0.0.1, each with its own custom resource, so
that tasks can be seen landing on either): outputs byte-identical to the local executor, corral-recipe.json
naming the nodes, a split GGUF written part by part on both nodes, and a node killed mid-run (kill -9 of
its raylet) costing a retry, not a result. Plus the executor choice and resource requests, without Ray."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_merge_weights import inputs  # noqa: F401 - the fixture: a cut demo:scout base and three fine-tunes
from test_shard_fanout import SHARDED  # the prune recipe of its local test

from toolbox.cli.main import main
from toolbox.recipe import load_recipe, run_recipe

DECL = "below-700m"
START_TIMEOUT = 120  # seconds for `ray start` (the two shared cores may be busy)
RUN_TIMEOUT = 300  # a recipe run on the cluster
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() \
    else shutil.which("ray") or "ray"  # the CLI that pip installs beside this Python
SPLIT = """\
corral: 1
name: split
source: demo:scout
license:
  mau_declaration: below-700m
steps:
  - id: gguf
    uses: convert
    with: {to: gguf, outtype: q8_0, split_max_size: 10M}
    output: Llama-4-split-q8_0.gguf
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_start(args: list[str], env: dict[str, str], attempts: int = 2) -> int:
    """`ray start ARGS` in a new session; returns its process group (the node's daemons stay in it). A failed
    start (Ray gives a raylet 30 s to register, which a loaded machine can miss) has its daemons stopped and is
    tried once more."""
    for attempt in range(attempts):
        proc = subprocess.Popen([RAY, "start", *args, "--disable-usage-stats"], env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            _stop(proc.pid)
            raise
        if proc.returncode == 0:
            return proc.pid
        _stop(proc.pid)  # what the failed start left running (gcs_server, monitors)
        assert attempt + 1 < attempts, out[-2000:]
    raise AssertionError("unreachable")


def _group(pgid: int, *, parent: int | None = None) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes in one process group (or, with `parent`, its children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = dict(ln.split(":", 1) for ln in (entry / "status").read_text().splitlines() if ":" in ln)
            if (parent is None and os.getpgid(int(entry.name)) != pgid) or \
                    (parent is not None and int(status["PPid"]) != parent):
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ProcessLookupError, KeyError, ValueError):
            continue
        if cmd and "zombie" not in status.get("State", ""):
            found.append((int(entry.name), cmd))
    return found


def _stop(pgid: int) -> None:
    """Our node's processes, by their process group: never `ray stop`, which would stop any Ray on the host."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + (3 if sig == signal.SIGTERM else 10)
        while _group(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, object]]:
    """A head node (resource node_a) and a second node process (node_b), 1 CPU each, stopped at the end."""
    import ray

    temp = Path(tempfile.mkdtemp(prefix="cray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    # a private cluster on 127.0.0.1 for this test, with Ray's token authentication off in all its processes
    # (nodes and this driver), whatever ~/.ray holds
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--object-store-memory=100000000"]
    groups = []
    try:
        groups.append(_ray_start(["--head", f"--port={port}", "--resources={\"node_a\": 1}", f"--temp-dir={temp}",
                                  "--include-dashboard=false", *common], env))
        groups.append(_ray_start([f"--address=127.0.0.1:{port}", "--resources={\"node_b\": 1}", *common], env))
        address = f"127.0.0.1:{port}"
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        deadline = time.monotonic() + START_TIMEOUT
        while sum(1 for n in ray.nodes() if n["Alive"]) < 2:
            assert time.monotonic() < deadline, "the second Ray node did not join"
            time.sleep(0.5)
        ray.shutdown()
        yield {"address": address, "head": groups[0], "worker": groups[1], "groups": groups, "env": env,
               "common": common}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for pgid in reversed(groups):
            _stop(pgid)
        shutil.rmtree(temp, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def _ensure_worker(cluster: dict[str, object]) -> None:
    """A live second node (resource node_b): a new one, stopped at the end like the first, when a kill test took
    the last one down."""
    import ray

    if any("/raylet/raylet " in cmd for _pid, cmd in _group(int(cluster["worker"]))):  # type: ignore[arg-type]
        return
    _stop(int(cluster["worker"]))  # type: ignore[arg-type]
    groups: list[int] = cluster["groups"]  # type: ignore[assignment]
    groups.append(_ray_start([f"--address={cluster['address']}", "--resources={\"node_b\": 1}",
                              *cluster["common"]], cluster["env"]))  # type: ignore[misc]
    cluster["worker"] = groups[-1]
    ray.init(address=str(cluster["address"]), log_to_driver=False, configure_logging=False)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while sum(1 for n in ray.nodes() if n["Alive"]) < 2:
            assert time.monotonic() < deadline, "the new second Ray node did not join"
            time.sleep(0.5)
    finally:
        ray.shutdown()


def _kill_worker_during(cluster: dict[str, object], task: str, run: Any) -> dict[str, object]:
    """Run `run()` in a thread; kill -9 the second node's raylet once it runs a `task` (a Ray task's worker is
    its raylet's child, titled ray::FUNCTION while it runs one); the run's result or error, within RUN_TIMEOUT."""
    result: dict[str, object] = {}

    def body() -> None:
        try:
            result["res"] = run()
        except BaseException as exc:  # reported by the caller's assertion
            result["exc"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    deadline = time.monotonic() + RUN_TIMEOUT
    (raylet,) = [pid for pid, cmd in _group(int(cluster["worker"])) if "/raylet/raylet " in cmd]  # type: ignore
    while not any(cmd.startswith(f"ray::{task}") for _pid, cmd in _group(0, parent=raylet)):
        assert thread.is_alive() and time.monotonic() < deadline, f"no {task} ever ran on the second node"
        time.sleep(0.05)
    os.kill(raylet, signal.SIGKILL)
    thread.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not thread.is_alive(), "the run did not finish after the node died"
    return result


def _hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.is_file() and p.name != "corral-recipe.json"}


def _nodes(record: dict) -> set[str]:
    """The custom resources of every node that built a step or a part, from corral-recipe.json."""
    names = set()
    for step in record["steps"]:
        by = step["built_by"] or {}
        for who in by.get("parts") or [by]:
            names.update(who.get("resources", []))
    return names


@pytest.fixture(scope="module")
def split_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The split GGUF set written by one process (the local executor)."""
    tmp = tmp_path_factory.mktemp("split-local")
    (tmp / "split.yaml").write_text(SPLIT)
    run_recipe(load_recipe(tmp / "split.yaml"), tmp / "out", cache_dir=tmp / "cache", executor="local")
    ref = _hashes(tmp / "out")
    assert len(ref) > 2  # really a split set
    return ref


@pytest.mark.slow
def test_matrix_recipe_on_two_nodes_equals_local(cluster, tmp_path: Path, capsys) -> None:
    args = ["recipe", "run", "scout-gguf", "--set", "source=demo:scout", "--set",
            "steps.gguf.matrix.quant=[q8_0, q4_0, q5_0]", "--mau-declaration", DECL]
    runs = {}
    for name, extra in (("local", ["--executor", "local"]), ("ray", ["--executor", "ray", "--address",
                                                                     str(cluster["address"])])):
        capsys.readouterr()
        code = main(["--json", "--no-progress", *args, *extra, "-o", str(tmp_path / name),
                     "--cache-dir", str(tmp_path / f"cache-{name}")])
        out, err = capsys.readouterr()
        assert code == 0, err
        runs[name] = json.loads(out)
    assert runs["ray"]["built"] == 9 and runs["ray"]["cached"] == 0
    local, remote = _hashes(tmp_path / "local"), _hashes(tmp_path / "ray")
    assert len(local) == 3 and remote == local
    record = json.loads((tmp_path / "ray" / "corral-recipe.json").read_text())
    assert {"node_a", "node_b"} <= _nodes(record)  # tasks landed on both nodes
    assert all(s["built_by"]["executor"] == "ray" and s["built_by"]["seconds"] > 0 for s in record["steps"])
    assert [o["files"] for o in record["outputs"]] == [
        o["files"] for o in json.loads((tmp_path / "local" / "corral-recipe.json").read_text())["outputs"]]


@pytest.mark.slow
def test_split_gguf_fans_out_per_part(cluster, split_reference: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "split.yaml").write_text(SPLIT)
    res = run_recipe(load_recipe(tmp_path / "split.yaml"), tmp_path / "out", cache_dir=tmp_path / "cache",
                     executor="ray", address=str(cluster["address"]))
    assert _hashes(tmp_path / "out") == split_reference
    (gguf,) = res.instances
    parts = gguf.built_by["parts"]
    assert sorted(p["name"].replace("model", "Llama-4-split-q8_0") for p in parts) == sorted(split_reference)
    assert {r for p in parts for r in p["resources"]} == {"node_a", "node_b"}
    assert not [p for p in (tmp_path / "cache" / "objects").iterdir() if p.name.startswith(".")]  # no debris


@pytest.mark.slow
def test_safetensors_shards_fan_out_per_shard(cluster, tmp_path: Path) -> None:
    """A prune whose output has four shards: a task per shard and one for the rest, on both nodes, assembled
    into the directory a local run writes, every file byte for byte."""
    (tmp_path / "sharded.yaml").write_text(SHARDED)
    trees, results = {}, {}
    for name, kw in (("local", {}), ("ray", {"address": str(cluster["address"])})):
        results[name] = run_recipe(load_recipe(tmp_path / "sharded.yaml"), tmp_path / name,
                                   cache_dir=tmp_path / f"cache-{name}", executor=name, **kw)
        out = tmp_path / name / "Llama-4-Scout-sharded-4e"
        trees[name] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
    assert trees["ray"] == trees["local"]
    assert len([n for n in trees["local"] if n.endswith(".safetensors")]) == 4
    assert "model.safetensors.index.json" in trees["local"] and "config.json" in trees["local"]
    (inst,) = results["ray"].instances
    parts = inst.built_by["parts"]
    assert [p["part"] for p in parts] == [0, 1, 2, 3, -1]  # the shards, then the rest (config, license, index)
    assert {r for p in parts for r in p["resources"]} == {"node_a", "node_b"}
    assert inst.files == results["local"].instances[0].files
    assert not [p for p in (tmp_path / "cache-ray" / "objects").iterdir() if p.name.startswith(".")]  # no debris


@pytest.mark.slow
def test_a_step_no_node_can_run_is_refused_not_queued(cluster, tmp_path: Path, monkeypatch, capsys) -> None:
    from toolbox.recipe import ray_executor

    monkeypatch.setitem(ray_executor.PEAK_BYTES, "convert", 1 << 50)  # 1 PiB of memory: no node has it
    (tmp_path / "split.yaml").write_text(SPLIT)
    code = main(["--no-progress", "recipe", "run", str(tmp_path / "split.yaml"), "--executor", "ray", "--address",
                 str(cluster["address"]), "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 4 and "no node of the Ray cluster has" in err and "memory 1048576.0 GiB" in err
    assert not (tmp_path / "out").exists()


ENV_RECIPE = """\
corral: 1
name: env
source: demo:scout
steps:
  - id: pruned
    uses: prune
    with: {keep: [0, 1, 2, 3, 4, 5, 6, 7]}
    output: Llama-4-Scout-env-8e
"""


@pytest.mark.slow
def test_driver_settings_reach_tasks_on_an_already_started_cluster(cluster, tmp_path: Path, monkeypatch) -> None:
    """Settings the driver gets after the cluster started (and after ray.init, by someone else) reach every
    task through its runtime_env: the step stamps the driver's MAU declaration, which no node was started
    with; the Hub endpoint arrives as the driver has it; the token is not forwarded, and no runtime_env holds it."""
    import ray

    from license.artifact import detect, read_file_meta
    from toolbox.recipe.executors import Job
    from toolbox.recipe.ray_executor import FORWARDED_ENV, SECRET_ENV, task_options

    def probe(names: list[str]) -> dict[str, str | None]:  # local, so Ray ships it by value to the workers
        import os

        return {k: os.environ.get(k) for k in names}

    secret = "hf_driverONLYsecretTOKEN0123456789abcd"
    monkeypatch.setenv("CORRAL_MAU_DECLARATION", "meta-license:ACME-2026-01")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/corral-test-hub")
    monkeypatch.setenv("CORRAL_HUB_TIMEOUT", "7")
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    (tmp_path / "env.yaml").write_text(ENV_RECIPE)
    ray.init(address=str(cluster["address"]), log_to_driver=False, configure_logging=False)
    try:
        res = run_recipe(load_recipe(tmp_path / "env.yaml"), tmp_path / "out", cache_dir=tmp_path / "cache",
                         executor="ray", address=str(cluster["address"]))
        assert ray.is_initialized()  # the run used the connection it found and left it open
        job = Job("prune", {}, "k", "prune", False, "/src", None, "/o", {})
        opts = task_options(job, 0, {})
        assert secret not in json.dumps(opts)
        seen = ray.get([ray.remote(probe).options(**opts, resources={node: 0.01}).remote(
            [*FORWARDED_ENV, *SECRET_ENV]) for node in ("node_a", "node_b")], timeout=RUN_TIMEOUT)
    finally:
        ray.shutdown()
    (inst,) = res.instances
    assert inst.built_by["executor"] == "ray"
    out = tmp_path / "out" / "Llama-4-Scout-env-8e"
    stamp = next(read_file_meta(f).corral for f in detect(out).files)
    assert stamp["corral.license.mau_declaration"] == "meta-license:ACME-2026-01"
    for env in seen:
        assert env["HF_ENDPOINT"] == "http://127.0.0.1:9/corral-test-hub" and env["CORRAL_HUB_TIMEOUT"] == "7"
        assert env["CORRAL_MAU_DECLARATION"] == "meta-license:ACME-2026-01" and env["SOURCE_DATE_EPOCH"] == ""
        assert env["CORRAL_CACHE_DIR"] == str(Path(os.environ["CORRAL_CACHE_DIR"]).absolute())
        assert env["HF_TOKEN"] != secret


@pytest.mark.slow
def test_killed_node_costs_a_retry_not_the_result(cluster, split_reference: dict[str, str], tmp_path: Path) -> None:
    """kill -9 of the second node's raylet while it runs a part: Ray retries the part on the head node."""
    _ensure_worker(cluster)
    (tmp_path / "split.yaml").write_text(SPLIT)
    result = _kill_worker_during(cluster, "remote_part", lambda: run_recipe(
        load_recipe(tmp_path / "split.yaml"), tmp_path / "out", cache_dir=tmp_path / "cache", executor="ray",
        address=str(cluster["address"])))
    assert "exc" not in result, result.get("exc")
    assert _hashes(tmp_path / "out") == split_reference
    assert not [p for p in (tmp_path / "cache" / "objects").iterdir() if p.name.startswith(".")]  # no work dirs


WEIGHTS = """\
corral: 1
name: weights
source: {base}
license:
  mau_declaration: below-700m
steps:
  - id: merged
    uses: merge
    with:
      method: ties
      models: [{{path: {ft0}, weight: 0.6, density: 0.5}}, {{path: {ft1}, weight: 0.4, density: 0.5}}]
      dtype: f32
      shard_size: 1M
    output: Llama-4-ties-sharded
"""


def _tree(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def weights_reference(inputs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], list]:  # noqa: F811
    """A TIES merge (density 0.5) with shard_size 1M by the local executor: its recipe, files and record."""
    base, models = inputs
    tmp = tmp_path_factory.mktemp("weights-local")
    recipe = tmp / "weights.yaml"
    recipe.write_text(WEIGHTS.format(base=base, ft0=models[0], ft1=models[1]))
    res = run_recipe(load_recipe(recipe), tmp / "out", cache_dir=tmp / "cache", executor="local")
    tree = _tree(tmp / "out" / "Llama-4-ties-sharded")
    assert len([n for n in tree if n.endswith(".safetensors")]) > 2  # really sharded
    return recipe, tree, res.instances[0].files


@pytest.mark.slow
def test_weight_merge_fans_out_per_shard(cluster, weights_reference, tmp_path: Path) -> None:
    """A weight merge whose output has several shards: a task per shard and one for the rest, on both nodes,
    assembled into the directory a local run writes, every file byte for byte."""
    _ensure_worker(cluster)
    recipe, tree, files = weights_reference
    res = run_recipe(load_recipe(recipe), tmp_path / "out", cache_dir=tmp_path / "cache", executor="ray",
                     address=str(cluster["address"]))
    assert _tree(tmp_path / "out" / "Llama-4-ties-sharded") == tree
    (inst,) = res.instances
    shards = len([n for n in tree if n.endswith(".safetensors")])
    assert [p["part"] for p in inst.built_by["parts"]] == [*range(shards), -1]
    assert {r for p in inst.built_by["parts"] for r in p["resources"]} == {"node_a", "node_b"}
    assert inst.files == files
    assert not [p for p in (tmp_path / "cache" / "objects").iterdir() if p.name.startswith(".")]  # no debris


@pytest.mark.slow
def test_killed_node_during_shard_tasks_costs_a_retry(cluster, weights_reference, tmp_path: Path) -> None:
    """kill -9 of the second node's raylet while it merges a shard: the shard is retried on the head node, the
    output equals the local run, and neither the killed task's work directory nor any other is left behind."""
    _ensure_worker(cluster)
    recipe, tree, _files = weights_reference
    result = _kill_worker_during(cluster, "remote_shard", lambda: run_recipe(
        load_recipe(recipe), tmp_path / "out", cache_dir=tmp_path / "cache", executor="ray",
        address=str(cluster["address"])))
    assert "exc" not in result, result.get("exc")
    assert _tree(tmp_path / "out" / "Llama-4-ties-sharded") == tree
    assert not [p for p in (tmp_path / "cache" / "objects").iterdir() if p.name.startswith(".")]  # no work dirs


# -- without a cluster ------------------------------------------------------------------------------
@pytest.mark.slow
def test_gguf_parts_written_one_by_one_equal_the_whole_set(scout_dir: Path, tmp_path: Path) -> None:
    """The per-part entry point the fan-out uses, in this process: each part alone is byte-identical to that
    file of a whole run, and gguf-py reads it as part i of n."""
    import gguf

    from converters.hf_to_gguf import convert_hf_to_gguf, split_part_count
    from license.stamp import LicenseOptions

    opts = {"outtype": "q8_0", "split_max_size": 20_000_000,
            "license_options": LicenseOptions(name="Llama-4-parts", mau_declaration=DECL)}
    for d in ["whole", *(f"p{i}" for i in range(8))]:
        (tmp_path / d).mkdir()
    whole = convert_hf_to_gguf(scout_dir, tmp_path / "whole" / "m.gguf", **opts).paths
    count = split_part_count(scout_dir, **opts)
    assert count == len(whole) > 1
    for i, ref in enumerate(whole):
        (part,) = convert_hf_to_gguf(scout_dir, tmp_path / f"p{i}" / "m.gguf", parts=[i], **opts).paths
        assert sorted(os.listdir(part.parent)) == [ref.name] and part.read_bytes() == ref.read_bytes()
        split = gguf.GGUFReader(part).fields["split.no"]
        assert int(split.parts[split.data[0]][0]) == i


def test_executor_choice_and_missing_ray(tmp_path: Path, monkeypatch, capsys) -> None:
    from toolbox.recipe.executors import choose

    monkeypatch.delenv("CORRAL_EXECUTOR", raising=False)
    assert choose(None, None) == "local" and choose(None, "ray") == "ray"
    monkeypatch.setenv("CORRAL_EXECUTOR", "local")
    assert choose(None, "ray") == "local" and choose("ray", None) == "ray"
    (tmp_path / "split.yaml").write_text(SPLIT.replace("steps:", "executor: ray\nsteps:"))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    monkeypatch.delenv("CORRAL_EXECUTOR")
    code = main(["--no-progress", "recipe", "run", str(tmp_path / "split.yaml"), "-o", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "corral[ray]" in err
    assert not (tmp_path / "out").exists()
    assert main(["--no-progress", "recipe", "run", str(tmp_path / "split.yaml"), "--executor", "dask"]) == 2


def test_task_options_follow_the_step(tmp_path: Path) -> None:
    from toolbox.recipe.executors import Job
    from toolbox.recipe.ray_executor import FORWARDED_ENV, GIB, MAX_RETRIES, SECRET_ENV, task_options

    def job(uses: str, **params: object) -> Job:
        return Job(uses, dict(params), "k", uses, uses in ("verify", "license-check"), "/src", None, "/o", {})

    plain = task_options(job("convert", to="gguf"), 5 * GIB, {"CPU": 2.0})
    env = plain.pop("runtime_env")["env_vars"]
    assert plain == {"num_cpus": 1, "num_gpus": 0, "memory": 2 * GIB, "max_retries": MAX_RETRIES,
                     "retry_exceptions": False}
    assert set(env) == set(FORWARDED_ENV) and not set(env) & set(SECRET_ENV)
    assert task_options(job("prune", keep_count=2, criterion="reap"), GIB, {})["memory"] == 4 * GIB
    assert task_options(job("convert", to="gguf"), 5 * GIB + 1, {"disk_gib": 100.0})["resources"] == {"disk_gib": 6}


def test_task_work_dirs_are_one_per_task_and_found_after(tmp_path: Path) -> None:
    """Every attempt of one fan-out task writes through the same work directory (a retry empties what a killed
    attempt left), distinct per task and per run; the driver finds every one a run's tasks left."""
    from toolbox.recipe.ray_executor import PARTS_SUFFIX, _fresh_work_dir, leftover_work_dirs, work_dir

    parts, other = (tmp_path / f".key.{tag}{PARTS_SUFFIX}" for tag in ("abcd1234", "ffff0000"))
    parts.mkdir()
    other.mkdir()
    killed = work_dir(parts, "shard1")
    (killed / "model").mkdir(parents=True)
    (killed / "model" / "model-00002-of-00004.safetensors").write_bytes(b"half a shard")
    assert work_dir(other, "shard1") != killed != work_dir(parts, "shard2")
    retry = _fresh_work_dir(parts, "shard1")
    assert retry == killed and not list(retry.iterdir())
    rest = _fresh_work_dir(parts, "rest")
    _fresh_work_dir(other, "rest")
    assert sorted(leftover_work_dirs(parts)) == sorted([killed, rest])
