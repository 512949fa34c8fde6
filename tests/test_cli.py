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
    assert code == 2 and "unknown demo variant" in err


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
