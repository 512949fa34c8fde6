"""The CLI as users and CI meet it: exit codes, JSON on stdout, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolbox.cli.main import main


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_inspect_is_one_document_on_stdout(scout_dir: Path, capsys) -> None:
    code, out, _err = run(["--json", "inspect", str(scout_dir)], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["architecture"] == "Llama4ForConditionalGeneration"
    assert info["experts"] == {"count": 16, "top_k": 1, "width": 32, "dense_width": 64}
    assert info["layers"]["nope"] == [3]
    assert info["tokenizer"]["vocab_size"] == 202048 and info["tokenizer"]["chat_template"]


def test_inspect_accepts_demo_names(capsys) -> None:
    code, out, _ = run(["--json", "inspect", "demo:maverick"], capsys)
    assert code == 0 and json.loads(out)["layers"]["moe"] == [1, 3]


def test_human_verify_and_exit_codes(scout_copy: Path, capsys) -> None:
    code, out, _ = run(["verify", str(scout_copy)], capsys)
    assert code == 0 and "OK" in out
    cfg = json.loads((scout_copy / "config.json").read_text())
    cfg["text_config"]["num_experts_per_tok"] = 99
    (scout_copy / "config.json").write_text(json.dumps(cfg))
    code, out, _ = run(["--json", "verify", str(scout_copy)], capsys)
    assert code == 1
    doc = json.loads(out)
    assert doc["exit_code"] == 1 and any(f["code"] == "config.top-k" for f in doc["findings"])


def test_bad_input_is_one_line_and_exit_3(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    code, out, err = run(["inspect", str(tmp_path)], capsys)
    assert code == 3 and out == ""
    assert "BertModel is not a Llama 4 model" in err and "Traceback" not in err
    code, out, err = run(["--json", "inspect", str(tmp_path)], capsys)
    assert code == 3 and json.loads(out)["error"] == "UnsupportedModelError"


def test_usage_errors_exit_2(capsys, tmp_path: Path) -> None:
    code, _, err = run(["inspect", "--no-such-flag", "x"], capsys)
    assert code == 2 and "No such option" in err
    code, _, err = run(["demo", "create", str(tmp_path / "d"), "--variant", "llama2"], capsys)
    assert code == 2 and "'llama2' is not one of 'scout', 'maverick'" in err  # a closed set, checked by the CLI
    assert not (tmp_path / "d").exists()


def test_existing_output_is_not_overwritten(tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "exists"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, _, err = run(["demo", "create", str(out_dir)], capsys)
    assert code == 2 and "--force" in err
    assert (out_dir / "keep.txt").read_text() == "mine"


def test_every_command_has_examples_in_help() -> None:
    for args in (["inspect"], ["verify"], ["demo", "create"], []):
        res = subprocess.run([sys.executable, "-m", "toolbox.cli.main", *args, "--help"], capture_output=True,
                             text=True, check=False)
        assert res.returncode == 0, res.stderr
        assert "Examples" in res.stdout and "corral " in res.stdout


def test_version(capsys) -> None:
    code, out, _ = run(["--version"], capsys)
    from toolbox import __version__

    assert code == 0 and out.strip() == f"corral {__version__}"


def test_cli_start_does_not_import_heavy_libraries() -> None:
    code = ("import sys; from toolbox.cli.main import main; rc = main(['--help']); "
            "heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'gguf', 'onnx', 'huggingface_hub') "
            "if m in sys.modules]; print(heavy)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_messages_are_never_markup(capsys) -> None:
    from toolbox.cli.output import Output

    out = Output()
    out.warn("tensor [/]evil and [bold red]x[/bold red]")
    out.error("bad [link=http://x]y[/link]", "fix [/]")
    err = capsys.readouterr().err
    assert "warning: tensor [/]evil and [bold red]x[/bold red]" in err
    assert "error: bad [link=http://x]y[/link]\nhint: fix [/]" in err


def test_json_results_are_strict_json() -> None:
    from toolbox.cli.output import json_document

    doc = json_document({"norm": float("nan"), "rows": [1.5, float("-inf")]})
    assert json.loads(doc, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == \
        {"norm": None, "rows": [1.5, None]}


def test_free_space_is_checked_before_a_write(tmp_path: Path, monkeypatch) -> None:
    import shutil

    from toolbox.errors import DiskFullError, ExitCode
    from toolbox.tensors.atomic import ensure_free_space

    ensure_free_space(tmp_path / "out.gguf", 1000, "a small file")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 3 << 20))
    with pytest.raises(DiskFullError, match=r"the GGUF output needs 5\.0 MiB but .* has 3\.0 MiB free") as exc:
        ensure_free_space(tmp_path / "new" / "out.gguf", 5 << 20, "the GGUF output")
    assert exc.value.exit_code == ExitCode.ACCESS and exc.value.path == str(tmp_path)


def test_os_errors_map_to_documented_codes(tmp_path: Path) -> None:
    import errno

    from toolbox.errors import from_os_error

    staged = str(tmp_path / ".out.corral-partial-x1" / "model.safetensors")
    cases = {errno.ENOSPC: 4, errno.EDQUOT: 4, errno.EACCES: 4, errno.EPERM: 4, errno.EROFS: 4, errno.EMFILE: 4,
             errno.ENOTDIR: 2, errno.ENAMETOOLONG: 2, errno.EISDIR: 2, errno.EEXIST: 2, errno.ELOOP: 2,
             errno.EIO: 3}
    for err, code in cases.items():
        e = from_os_error(OSError(err, os.strerror(err), "/src/x", None, staged))
        assert e.exit_code == code, errno.errorcode[err]
        assert e.hint and errno.errorcode[err] in e.message
    assert from_os_error(OSError(errno.ENOSPC, "No space left", "/src", None, staged)).path == str(tmp_path / "out")


def test_json_version_is_a_document(capsys) -> None:
    from toolbox import __version__

    code, out, _ = run(["--json", "--version"], capsys)
    assert code == 0 and json.loads(out) == {"name": "corral", "version": __version__}


def test_global_options_after_the_subcommand(scout_dir: Path, capsys) -> None:
    """`corral inspect X --json` is `corral --json inspect X`; a flag that is an option's value stays one."""
    code, out, _ = run(["inspect", str(scout_dir), "--json"], capsys)
    assert code == 0 and json.loads(out)["experts"]["count"] == 16
    code, out, err = run(["inspect", str(scout_dir), "-q"], capsys)
    assert code == 0 and out == "" and err == ""
    from toolbox.cli.app import command, hoist_global_options

    cli = command()
    assert hoist_global_options(["convert", "x", "--name", "-v", "--json", "--", "-q"], cli) == \
        ["--json", "convert", "x", "--name", "-v", "--", "-q"]
    assert hoist_global_options(["experts", "stats", "x", "--no-progress", "--top", "3"], cli) == \
        ["--no-progress", "experts", "stats", "x", "--top", "3"]


def test_every_command_has_one_json_contract(capsys) -> None:
    code, out, _ = run(["recipe", "show", "scout-gguf", "--json"], capsys)
    doc = json.loads(out)  # one document, not YAML
    assert code == 0 and doc["recipe"] == "scout-gguf" and "steps:" in doc["yaml"]
    code, out, _ = run(["--version", "--json"], capsys)
    assert code == 0 and json.loads(out)["name"] == "corral"


@pytest.mark.parametrize("argv", [["--json", "license", "check", "demo:scout", "--format", "text"],
                                  ["license", "check", "demo:scout", "--format", "sarif", "--json"],
                                  ["experts", "stats", "demo:scout", "--calibration", "x.txt", "--csv", "--json"]])
def test_conflicting_formats_are_refused(argv: list[str], capsys) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2 and "exclude each other" in err
    assert json.loads(out)["exit_code"] == 2


def test_closed_sets_suggest_the_nearest(capsys, tmp_path: Path) -> None:
    code, _, err = run(["convert", "demo:scout", "--to", "ggfu", "-o", str(tmp_path / "x.gguf")], capsys)
    assert code == 2 and "did you mean 'gguf'?" in err and "'ggfu' is not one of" in err
    assert "Value error" not in err and not (tmp_path / "x.gguf").exists()
    code, _, err = run(["convert", "demo:scout", "--to", "gguf", "--outtype", "q4km", "-o", str(tmp_path / "y")],
                       capsys)
    assert code == 2 and "did you mean 'q4_k_m'?" in err
    code, _, err = run(["experts", "prune", "demo:scout", "-o", str(tmp_path / "p"), "--keep-count", "8",
                        "--criterion", "reep"], capsys)
    assert code == 2 and "did you mean 'reap'?" in err
    code, _, _ = run(["convert", "demo:scout", "--to", "GGUF", "--outtype", "nope", "-o", str(tmp_path / "z")],
                     capsys)
    assert code == 2  # case does not matter for the target; the bad --outtype is what is refused


def test_missing_optional_dependency_is_an_install_hint() -> None:
    """`verify --run` without onnxruntime: exit 2 and the pip command, never 'internal error' (exit 70)."""
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "from toolbox.cli.main import main\n"
            "sys.exit(main(['--json', 'verify', 'demo:scout', '--run']))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 2, res.stderr[-2000:]
    assert "pip install 'onnxruntime" in res.stderr and "internal error" not in res.stderr
    assert json.loads(res.stdout)["error"] == "MissingDependencyError"


def test_import_error_of_an_optional_package_anywhere_is_exit_2(monkeypatch, capsys) -> None:
    from toolbox.cli import inspect_cmd

    def broken(*_a: object, **_k: object) -> None:
        raise ModuleNotFoundError("No module named 'llama_cpp'", name="llama_cpp")

    monkeypatch.setattr(inspect_cmd, "inspect_checkpoint", broken, raising=False)
    monkeypatch.setattr("toolbox.inspect.inspect_checkpoint", broken)
    code, _, err = run(["inspect", "demo:scout"], capsys)
    assert code == 2 and "llama-cpp-python" in err


def test_third_party_output_follows_quiet_and_verbose(capfd: pytest.CaptureFixture[str]) -> None:
    """llama-cpp-python prints llama.cpp's log unless its logger's level says no; transformers' bars
    ("Loading weights" is its logging.tqdm) and warnings are held back without -v, the bars also with
    -v --no-progress, and everything is restored after the command."""
    import logging

    import transformers

    from toolbox.cli.thirdparty import third_party_output

    tf = transformers.utils.logging
    lg = logging.getLogger("llama-cpp-python")
    before, bars_before = lg.level, tf.is_progress_bar_enabled()
    capfd.readouterr()
    with third_party_output(verbose=False, quiet=True, progress=False):
        assert lg.level > logging.CRITICAL and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        list(tf.tqdm(range(3), desc="Loading weights"))
        tf.get_logger("transformers.modeling_utils").warning("some advisory")
    assert capfd.readouterr().err == ""
    assert lg.level == before and tf.is_progress_bar_enabled() == bars_before
    with third_party_output(verbose=True, quiet=False, progress=False):
        assert lg.level == logging.DEBUG and not tf.is_progress_bar_enabled()
    with third_party_output(verbose=True, quiet=False, progress=True):
        assert tf.is_progress_bar_enabled() == bars_before


def test_sizes_and_plurals() -> None:
    from toolbox.cli.output import human_size, plural

    assert [human_size(n) for n in (0, 1023, 1024, 65_798_144, 3 * 2**30)] == \
        ["0 B", "1023 B", "1.00 KiB", "62.75 MiB", "3.00 GiB"]
    assert plural(1, "shard") == "1 shard" and plural(2, "file") == "2 files" and plural(0, "file") == "0 files"


@pytest.mark.slow  # two layer-streamed forward passes (~10 s on 2 cores)
def test_experts_stats_top_shows_the_most_used(scout_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from experts_ref import calibration_text

    monkeypatch.setenv("COLUMNS", "160")
    cal = calibration_text(tmp_path / "cal.txt", words=60, seed=3)
    base = ["experts", "stats", str(scout_dir), "--calibration", str(cal), "--max-tokens", "32", "--seq-len", "32"]
    code, out, _ = run(["--json", *base], capsys)
    doc = json.loads(out)
    layer, rows = next(iter(doc["layers"].items()))
    top = sorted(rows, key=lambda e: -e["frequency"])[:3]
    code, out, _ = run([*base, "--top", "3"], capsys)
    assert code == 0 and f"MoE layer {layer} (the 3 most used of 16)" in out
    table = out.split(f"MoE layer {layer} ")[1].split("MoE layer")[0]
    shown = [int(line.split()[1]) for line in table.splitlines() if line.strip().startswith("│")
             and line.split()[1].isdigit()]
    assert shown == [e["expert"] for e in top]


def _st_metadata(directory: Path) -> dict[str, str]:
    """The `__metadata__` of a directory's first safetensors file, read from its header."""
    import struct

    with open(sorted(directory.glob("*.safetensors"))[0], "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))["__metadata__"]


@pytest.mark.slow
def test_lossy_conversion_back_to_hf_says_so(tmp_path: Path, capsys) -> None:
    decl = ["--mau-declaration", "below-700m"]
    q4, bf16 = tmp_path / "scout-q4_0.gguf", tmp_path / "scout-bf16.gguf"
    assert main(["-q", "convert", "demo:scout", "--to", "gguf", "--outtype", "q4_0", "-o", str(q4), *decl]) == 0
    assert main(["-q", "convert", "demo:scout", "--to", "gguf", "--outtype", "bf16", "-o", str(bf16), *decl]) == 0
    capsys.readouterr()
    code, out, err = run(["--json", "--no-progress", "convert", str(q4), "--to", "hf", "-o", str(tmp_path / "q"),
                          *decl], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["lossy"] is True and "dequantized from Q4_0" in doc["lossy_reasons"][0]
    assert "warning" in err.lower() and "lossy" in err
    meta = _st_metadata(tmp_path / "q")
    assert meta["corral.model.name"].endswith("-dequantized") and "q4_0" not in meta["corral.model.name"].lower()
    assert json.loads(meta["corral.provenance"])["operations"][-1]["lossy"] is True
    # the size reported is the directory's, not the tensors' alone
    on_disk = sum(p.stat().st_size for p in (tmp_path / "q").rglob("*") if p.is_file())
    assert doc["disk_bytes"] == on_disk
    # bf16 -> bf16 is exact: no flag, no warning, no rename; bf16 -> f16 narrows
    code, out, err = run(["--json", "--no-progress", "convert", str(bf16), "--to", "hf", "-o", str(tmp_path / "b"),
                          *decl], capsys)
    assert code == 0 and json.loads(out)["lossy"] is False and "lossy" not in err
    assert "dequantized" not in _st_metadata(tmp_path / "b")["corral.model.name"]
    assert "lossy" not in json.loads(_st_metadata(tmp_path / "b")["corral.provenance"])["operations"][-1]
    code, out, err = run(["--json", "--no-progress", "convert", str(bf16), "--to", "hf", "--dtype", "f16", "-o",
                          str(tmp_path / "h"), *decl], capsys)
    assert code == 0 and json.loads(out)["lossy"] is True and "narrowed BF16 to F16" in err


def test_gguf_summary_reports_the_file_size(tmp_path: Path, capsys) -> None:
    dst = tmp_path / "s.gguf"
    code, out, _ = run(["--no-progress", "convert", "demo:scout", "--to", "gguf", "--outtype", "q8_0", "-o", str(dst),
                        "--mau-declaration", "below-700m"], capsys)
    assert code == 0 and f"{dst.stat().st_size / 2**20:.1f} MiB" in out
