"""Hostile and careless command lines through the real CLI entry point (`toolbox.cli.main.main`).

Every case asserts the documented exit code, one error line (plus at most one hint line) on
stderr without a traceback, exactly one JSON document on stdout under --json, and nothing left
at the output path (no output, no `.NAME.corral-*` staging leftovers). Environment failures are
produced for real where the machine allows it: a 4 MiB tmpfs for a full disk, the same tmpfs
remounted read-only, `chattr +i` for permission denied (the tests run as root, which ignores
mode bits).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from real_configs import scout_config
from safetensors.numpy import save_file

from toolbox.cli.main import main
from toolbox.cli.output import one_line

DECL = ["--mau-declaration", "below-700m"]


# -- helpers ------------------------------------------------------------------------------------
def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _error_line(err: str) -> str:
    """stderr is one `error:` line plus at most one `hint:` line, and no traceback."""
    lines = err.rstrip("\n").split("\n")
    assert "Traceback" not in err, err
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), err
    assert len(lines) == 1 or lines[1].startswith("hint: "), err
    return lines[0]


def refused(args: list[str], capsys: pytest.CaptureFixture[str], code: int) -> tuple[dict, str]:
    """Run with --json: the exit code, one JSON document on stdout, one error line on stderr."""
    got, out, err = _run(["--json", *args], capsys)
    assert got == code, (got, out, err)
    doc = json.loads(out)  # exactly one document: json.loads refuses trailing data
    assert doc["exit_code"] == code and doc["message"] and doc["error"]
    line = _error_line(err)
    assert one_line(doc["message"]) in line
    return doc, line


def nothing_left(target: Path) -> None:
    assert not os.path.lexists(target), target
    if target.parent.is_dir():
        left = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.corral-")]
        assert left == [], left


def _config_dir(tmp_path: Path, edit=None, raw: str | None = None) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    cfg = scout_config()
    if edit is not None:
        edit(cfg["text_config"])
    (d / "config.json").write_text(raw if raw is not None else json.dumps(cfg))
    return d


def _have_mounts() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def small_fs(where: Path, size: str = "4m") -> Iterator[Path | None]:
    """A tiny tmpfs at `where` (None when this machine cannot mount one)."""
    where.mkdir()
    if not _have_mounts() or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                            capture_output=True).returncode:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# -- markup in data -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["x[/]y", "[bold red]boom[/bold red]", "a[link=file:///etc]b"])
def test_markup_in_a_path_is_printed_verbatim(tmp_path: Path, capsys, name: str) -> None:
    path = str(tmp_path / name)
    doc, line = refused(["inspect", path], capsys, 3)
    assert path in line and doc["path"] == path
    code, out, err = _run(["inspect", path], capsys)  # human mode: the same line, nothing eaten
    assert code == 3 and out == "" and path in _error_line(err)


def test_markup_in_a_path_of_a_successful_run(scout_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "500")  # no wrapping of the path cell
    link = tmp_path / "[bold red]scout:thumbs_up:"  # rich would print "scout👍"
    link.symlink_to(scout_dir)
    code, out, err = _run(["inspect", str(link)], capsys)
    assert code == 0 and str(link) in out and "Traceback" not in err


def test_markup_in_tensor_names(tmp_path: Path, capsys) -> None:
    d = _config_dir(tmp_path)
    save_file({"[/]evil": np.zeros(2, np.float32), "[bold red]x": np.zeros(2, np.float32)},
              str(d / "model.safetensors"))
    code, out, err = _run(["verify", str(d)], capsys)
    assert code in (1, 3) and "[/]evil" in out and "[bold red]x" in out and "Traceback" not in err
    code, out, _ = _run(["--json", "verify", str(d)], capsys)
    assert any("[/]evil" in (f.get("tensor") or f["message"]) for f in json.loads(out)["findings"])


def test_control_characters_stay_on_one_line(tmp_path: Path, capsys) -> None:
    path = str(tmp_path / "a\nb\x1b[2Jc")
    _, line = refused(["inspect", path], capsys, 3)
    assert "\\n" in line and "\x1b" not in line


# -- usage errors under --json ------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["inspect", "--no-such-flag", "x"],          # unknown option
    ["inspect"],                                 # missing argument
    ["demo", "create", "x", "--seed", "many"],   # bad value
    ["no-such-command"],
    [],                                          # no command at all
], ids=["unknown-option", "missing-argument", "bad-value", "unknown-command", "no-command"])
def test_usage_errors_are_json_documents(args: list[str], capsys) -> None:
    doc, _ = refused(args, capsys, 2)
    assert doc["error"] == "UsageError" and doc["hint"].startswith("see 'corral")


# -- config.json ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [
    ("num_hidden_layers", 10**12),
    ("num_attention_heads", 0),
    ("hidden_size", "64"),
    ("hidden_size", 64.5),
    ("num_local_experts", True),
    ("moe_layers", list(range(5000))),
])
def test_config_types_and_bounds(tmp_path: Path, capsys, field: str, value: object) -> None:
    d = _config_dir(tmp_path, lambda tc: tc.__setitem__(field, value))
    t0 = time.monotonic()
    doc, line = refused(["inspect", str(d)], capsys, 3)
    assert time.monotonic() - t0 < 10
    assert doc["error"] == "ConfigError" and "config.json" in line and field in line


@pytest.mark.parametrize(("field", "literal"), [("vocab_size", "9" * 5001), ("rms_norm_eps", "NaN")])
def test_config_numbers_json_cannot_hold(tmp_path: Path, capsys, field: str, literal: str) -> None:
    cfg = scout_config()
    cfg["text_config"][field] = 123456789
    d = _config_dir(tmp_path, raw=json.dumps(cfg).replace("123456789", literal))
    doc, line = refused(["inspect", str(d)], capsys, 3)
    assert doc["error"] == "ConfigError" and "config.json" in line and field in line


def test_tokenizer_files_are_bounded(scout_dir: Path, tmp_path: Path, capsys) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in scout_dir.iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json"):
            (d / f.name).symlink_to(f)
    with open(d / "tokenizer.json", "wb") as f:  # sparse: 300 MiB listed, nothing on disk
        f.truncate(300 * 2**20)
    (d / "tokenizer_config.json").write_text('{"bos_token": "a", "bos_token": "b"}')
    from toolbox.errors import TokenizerError
    from toolbox.tokenizer_files import load_tokenizer_files

    with pytest.raises(TokenizerError, match="more than"):
        load_tokenizer_files(d)
    code, out, _ = _run(["--json", "verify", str(d)], capsys)
    assert code == 3 and any(f["code"] == "tokenizer.unreadable" for f in json.loads(out)["findings"])


# -- output locations -----------------------------------------------------------------------------
def test_output_under_an_existing_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "file.txt").write_text("mine")
    target = tmp_path / "file.txt" / "out"
    doc, line = refused(["demo", "create", str(target)], capsys, 2)
    assert doc["error"] == "OutputLocationError" and "not a directory" in line
    assert (tmp_path / "file.txt").read_text() == "mine"


def test_output_in_proc(capsys) -> None:
    doc, _ = refused(["convert", "demo:scout", "--to", "gguf", "-o", "/proc/x.gguf", *DECL], capsys, 2)
    assert doc["error"] == "OutputLocationError" and not os.path.exists("/proc/x.gguf")


def test_output_name_of_300_characters(tmp_path: Path, capsys) -> None:
    target = tmp_path / ("a" * 296 + ".gguf")
    doc, line = refused(["convert", "demo:scout", "--to", "gguf", "-o", str(target), *DECL], capsys, 2)
    assert doc["error"] == "OutputLocationError" and "shorter" in (doc["hint"] or "") and len(line) < 600
    nothing_left(target)


def test_disk_full(tmp_path: Path, capsys, monkeypatch) -> None:
    with small_fs(tmp_path / "small") as fs:
        if fs is None:  # no tmpfs here: the same refusal from a file system that reports 4 MiB free
            import shutil as sh

            monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(4 << 20, 4 << 20, 0))
            fs = tmp_path / "small"
        target = fs / "scout.gguf"
        doc, line = refused(["convert", "demo:scout", "--to", "gguf", "-o", str(target), *DECL], capsys, 4)
        assert doc["error"] == "DiskFullError" and "free" in line
        nothing_left(target)


def _os_error_in_writes(monkeypatch, err: int) -> None:
    """Where no tmpfs can be mounted: the demo writer's file writes fail with `err`, as the kernel's would."""
    import errno

    import toolbox.demo

    def fail(out, *_a, **_k):
        raise OSError(err, os.strerror(err), str(Path(out) / "model.safetensors"))

    monkeypatch.setattr(toolbox.demo, "create_demo", fail)
    assert errno.errorcode[err]


def test_disk_full_during_the_write(tmp_path: Path, capsys, monkeypatch) -> None:
    """A write whose size is not checked ahead (demo create) meets ENOSPC itself: exit 4, nothing left."""
    import errno

    with small_fs(tmp_path / "small") as fs:
        if fs is None:
            _os_error_in_writes(monkeypatch, errno.ENOSPC)
            fs = tmp_path / "small"
        target = fs / "demo"
        doc, line = refused(["demo", "create", str(target)], capsys, 4)
        assert doc["error"] == "DiskFullError" and "ENOSPC" in line and str(target) in line
        nothing_left(target)


def test_read_only_file_system(tmp_path: Path, capsys, monkeypatch) -> None:
    import errno

    with small_fs(tmp_path / "ro") as fs:
        if fs is None:
            _os_error_in_writes(monkeypatch, errno.EROFS)
            fs = tmp_path / "ro"
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        target = fs / "demo"
        doc, _ = refused(["demo", "create", str(target)], capsys, 4)
        assert doc["error"] == "ReadOnlyFileSystemError" and "read-only" in (doc["hint"] or "")
        nothing_left(target)


def test_permission_denied(tmp_path: Path, capsys, monkeypatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o500)
    elif subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
        # no CAP_LINUX_IMMUTABLE (a container): the kernel's answer, given for files created in `locked`
        real_open = os.open

        def refuse(path, flags, *a, **k):
            if str(path).startswith(f"{locked}/") and flags & os.O_CREAT:
                raise PermissionError(1, "Operation not permitted", str(path))
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(os, "open", refuse)
    try:
        target = locked / "out.gguf"
        doc, _ = refused(["convert", "demo:scout", "--to", "gguf", "-o", str(target), *DECL], capsys, 4)
        assert doc["error"] == "PermissionDeniedError" and doc["path"] == str(target)
        nothing_left(target)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        locked.chmod(0o700)


# -- unbounded expansion and sizes ----------------------------------------------------------------
@pytest.mark.parametrize("keep", ["0-99999999999", "0-1023", "0-7;x", "²:0-7"])
def test_expert_lists_are_refused_early(tmp_path: Path, capsys, keep: str) -> None:
    target = tmp_path / "pruned"
    t0 = time.monotonic()
    doc, _ = refused(["experts", "prune", "demo:scout", "-o", str(target), "--keep", keep, *DECL], capsys, 2)
    assert time.monotonic() - t0 < 20 and doc["error"] == "UsageError"
    nothing_left(target)


@pytest.mark.parametrize("size", ["-5G", "1", "garbage", "nan", "1e9", "99999999999999999999999T"])
def test_split_max_size_values(tmp_path: Path, capsys, size: str) -> None:
    target = tmp_path / "scout.gguf"
    doc, _ = refused(["convert", "demo:scout", "--to", "gguf", "-o", str(target), "--split-max-size", size, *DECL],
                     capsys, 2)
    assert "size" in doc["message"]
    nothing_left(target)


# -- every other exit is a JSON document too ------------------------------------------------------
def test_interrupt_and_internal_error_and_io_error(monkeypatch, capsys, tmp_path: Path) -> None:
    import errno

    import toolbox.inspect

    for exc, code, kind in ((KeyboardInterrupt(), 130, "Interrupted"),
                            (RuntimeError("boom [/]"), 70, "InternalError"),
                            (OSError(errno.EIO, "Input/output error", str(tmp_path / "shard")), 3, "InputReadError")):
        def fail(*_a, _exc=exc, **_k):
            raise _exc

        monkeypatch.setattr(toolbox.inspect, "inspect_checkpoint", fail)
        got, out, err = _run(["--json", "inspect", str(tmp_path)], capsys)
        assert got == code and json.loads(out)["error"] == kind
        _error_line(err)


# -- stale partials -------------------------------------------------------------------------------
_HOLD = textwrap.dedent("""
    import sys, time
    from toolbox.tensors.atomic import atomic_directory, atomic_file
    if sys.argv[2] == "file":
        with atomic_file(sys.argv[1]) as tmp:
            tmp.write_bytes(b"x" * 1000)
            print(tmp, flush=True)
            time.sleep(120)
    with atomic_directory(sys.argv[1]) as staging:
        (staging / "half.bin").write_bytes(b"x" * 1000)
        print(staging, flush=True)
        time.sleep(120)
""")


def _holder(target: Path, kind: str = "directory") -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(target), kind], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, "the holder did not start"
    return proc, Path(line)


def test_stale_partials_of_killed_runs_are_removed_live_ones_kept(tmp_path: Path) -> None:
    from toolbox.tensors.atomic import atomic_directory, remove_stale_partials

    target = tmp_path / "out"
    live, live_partial = _holder(target)
    dead, dead_partial = _holder(target)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        assert dead_partial.is_dir() and live_partial.is_dir()  # kill -9 leaves the partial behind
        with atomic_directory(target) as staging:  # the next run writing the same target tidies up
            (staging / "done").write_text("ok")
        assert not dead_partial.exists(), "a dead run's partial survived"
        assert live_partial.is_dir() and (live_partial / "half.bin").stat().st_size == 1000  # never a live one
        assert (target / "done").read_text() == "ok"
        assert remove_stale_partials(target) == []
    finally:
        live.kill()
        live.wait(10)
    assert remove_stale_partials(target) == [live_partial] and not live_partial.exists()


def test_stale_partial_files_too(tmp_path: Path) -> None:
    from toolbox.tensors.atomic import atomic_file

    target = tmp_path / "manifest.json"
    live, live_partial = _holder(target, "file")
    dead, dead_partial = _holder(target, "file")
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        with atomic_file(target) as tmp:
            tmp.write_text("{}")
        assert not dead_partial.exists() and live_partial.stat().st_size == 1000 and target.read_text() == "{}"
    finally:
        live.kill()
        live.wait(10)


def test_stale_partial_cleaned_by_the_cli(tmp_path: Path, capsys) -> None:
    target = tmp_path / "demo"
    proc, partial = _holder(target)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    code, out, _ = _run(["--json", "demo", "create", str(target)], capsys)
    assert code == 0 and json.loads(out)["path"] == str(target)
    assert not partial.exists() and [p.name for p in tmp_path.iterdir()] == ["demo"]
