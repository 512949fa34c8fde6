"""Weight merges written shard by shard (what a Ray task per safetensors file writes), and `--shard-size` on the
merge, prune and extract commands: the parts, written separately and put together, are the whole run's
directory byte for byte; a shard run merges only its own files' tensors; the CLI's files are the library's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from test_merge_weights import OPTS, inputs  # noqa: F401 - the fixture: base + three float32 fine-tunes
from test_shard_fanout import KEEP, _assemble, _files

from toolbox.cli.main import main
from toolbox.experts.extract import extract_dense
from toolbox.experts.prune import prune_experts
from toolbox.merge.merge import merge_shard_count
from toolbox.merge.weights import merge_weights
from toolbox.tensors.sink import INDEX_NAME

SHARD = 10**6  # the smallest size a recipe or --shard-size takes: the cut demo base in f32 is ~4 of them
DECL = "below-700m"


@pytest.fixture(autouse=True)
def _reproducible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setenv("CORRAL_MAU_DECLARATION", DECL)


@pytest.mark.parametrize(("method", "kw"), [
    ("ties", {"weights": [0.6, 0.4], "densities": [0.5]}),  # a top-k threshold per tensor and input
    ("dare_linear", {"densities": [0.3], "seed": 7}),  # random masks and an L1 rescale per tensor
])
def test_weight_merge_in_shards_is_the_whole_run(method: str, kw: dict, inputs: tuple[Path, list[Path]],  # noqa: F811
                                                 tmp_path: Path) -> None:
    base, models = inputs
    n = merge_shard_count(base, dtype="f32", max_shard_bytes=SHARD)
    assert n > 2
    whole = tmp_path / "whole"
    merge_weights(base, models[:2], whole, method=method, dtype="f32", max_shard_bytes=SHARD, license_options=OPTS,
                  **kw)
    index = json.loads((whole / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) == n == len(list(whole.glob("*.safetensors")))
    parts = [tmp_path / "odd", tmp_path / "even", tmp_path / "rest"]
    for d, shards in zip(parts, (range(1, n, 2), range(0, n, 2), ()), strict=True):
        res = merge_weights(base, models[:2], d, method=method, dtype="f32", max_shard_bytes=SHARD,
                            shards=tuple(shards), license_options=OPTS, **kw)
        mine = {f.name for f in d.glob("*.safetensors")}
        # only the tensors of its own files were read and merged
        assert sum(res.passes.values()) == sum(1 for f in index["weight_map"].values() if f in mine)
    assert not list(parts[2].glob("*.safetensors")) and (parts[2] / "config.json").is_file()
    assert _assemble(parts) == _files(whole)  # shards, index, config, tokenizer, license files: byte for byte
    metas = []
    for f in sorted(whole.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:  # the safetensors library's reader
            metas.append(h.metadata())
    assert all(m == metas[0] for m in metas) and "sha256" in json.dumps(metas[0])  # one provenance, input hashes


def test_cli_merge_method_shard_size(inputs: tuple[Path, list[Path]], tmp_path: Path, capsys) -> None:  # noqa: F811
    base, models = inputs
    lib = tmp_path / "lib"
    merge_weights(base, models[:2], lib, method="ties", densities=[0.5], dtype="f32", max_shard_bytes=SHARD,
                  license_options=OPTS)
    code = main(["--no-progress", "merge", "--method", "ties", str(base), str(models[0]), str(models[1]),
                 "--density", "0.5", "--dtype", "f32", "--shard-size", "1M", "-o", str(tmp_path / "cli")])
    assert code == 0, capsys.readouterr().err
    assert _files(tmp_path / "cli") == _files(lib)
    assert len(list(lib.glob("*.safetensors"))) == merge_shard_count(base, dtype="f32", max_shard_bytes=SHARD) > 2


def test_cli_prune_and_extract_shard_size(tmp_path: Path, capsys) -> None:
    prune_experts("demo:scout", tmp_path / "lib-prune", keep=KEEP, max_shard_bytes=SHARD)
    code = main(["--no-progress", "experts", "prune", "demo:scout", "--keep", "0,3,5,9", "--shard-size", "1MB",
                 "-o", str(tmp_path / "cli-prune")])
    assert code == 0, capsys.readouterr().err
    assert _files(tmp_path / "cli-prune") == _files(tmp_path / "lib-prune")
    assert len(list((tmp_path / "cli-prune").glob("*.safetensors"))) == 4
    extract_dense("demo:scout", tmp_path / "lib-dense", expert=2, max_shard_bytes=2 * SHARD)
    code = main(["--no-progress", "experts", "extract", "demo:scout", "--dense", "2", "--shard-size", "2M",
                 "-o", str(tmp_path / "cli-dense")])
    assert code == 0, capsys.readouterr().err
    assert _files(tmp_path / "cli-dense") == _files(tmp_path / "lib-dense")
    assert len(list((tmp_path / "cli-dense").glob("*.safetensors"))) > 1


@pytest.mark.parametrize("argv", [
    ["experts", "prune", "demo:scout", "--keep", "0-7", "--to", "gguf", "--shard-size", "2G"],
    ["experts", "extract", "demo:scout", "--dense", "2", "--to", "gguf", "--shard-size", "2G"],
    ["merge", "demo:scout", "LORA", "--to", "gguf", "--shard-size", "2G"],
    ["experts", "prune", "demo:scout", "--keep", "0-7", "--shard-size", "1k"],
    ["experts", "prune", "demo:scout", "--keep", "0-7", "--shard-size", "0"],
    ["experts", "prune", "demo:scout", "--keep", "0-7", "--shard-size", "-5G"],
])
def test_cli_shard_size_refusals(argv: list[str], tmp_path: Path, capsys) -> None:
    """A GGUF output, 0, a size below 1 MB or not a size: exit 2 before anything is read or written."""
    out = tmp_path / ("o.gguf" if "gguf" in argv else "o")
    argv = [str(tmp_path) if a == "LORA" else a for a in argv]
    assert main(["--no-progress", *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--shard-size" in err or "size" in err
    assert not out.exists()
