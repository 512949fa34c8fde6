"""Every command's --help, rendered as a user sees it: no Python type names, no copied epilogs,
PATH help that names every format the command accepts, closed sets that match the code."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from toolbox.cli.main import main

# what Typer prints when a value has no metavar: <bool>, <str>, <list[float]>, <list[Path]>, {PATH}
LEAKS = re.compile(r"<(?:bool|str|int|float|path|file|dir|Path|list\[[^\]]*\])>|\{[A-Z_]+\}|list\[")
# arguments that take a checkpoint or artifact, and the formats each must name in its help
FORMATS = {("inspect", "PATH"), ("verify", "PATH"), ("license check", "PATH"), ("license stamp", "PATH"),
           ("convert", "SRC")}


def _commands() -> Iterator[tuple[str, Any]]:
    from toolbox.cli.app import command

    stack: list[tuple[str, Any]] = [("", command())]
    while stack:
        path, cmd = stack.pop()
        yield path, cmd
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            stack.append((f"{path} {name}".strip(), sub))


COMMANDS = dict(_commands())


def _help(path: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main([*path.split(), "--help"]) == 0
    return capsys.readouterr().out


def test_the_tree_is_walked() -> None:
    assert {"inspect", "verify", "convert", "merge", "download", "experts stats", "experts prune",
            "license check", "license stamp", "recipe run", "recipe show", "demo create"} <= set(COMMANDS)


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_help_has_no_type_name_leaks(path: str, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per option: a leak cannot hide in a wrapped cell
    text = _help(path, capsys)
    assert "Usage: corral" in text
    leaks = sorted(set(LEAKS.findall(text)))
    assert not leaks, f"corral {path} --help shows {leaks}"


def test_flags_show_no_value_and_choices_show_their_set(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    text = _help("convert", capsys)
    assert re.search(r"--force\s{2,}Replace", text), "a flag takes no value: nothing between it and its help"
    assert "gguf|hf|onnx" in text
    from toolbox.tensors.gguf.quant import ALL_OUTTYPES

    assert all(t in text for t in ALL_OUTTYPES)  # every --outtype the converter accepts, K-/I-quants included
    assert "Usage: corral convert [OPTIONS] SRC" in text


def test_no_two_commands_share_an_epilog() -> None:
    seen: dict[str, str] = {}
    for path, cmd in COMMANDS.items():
        if getattr(cmd, "commands", None) is not None or not cmd.epilog:
            continue
        assert cmd.epilog not in seen, f"'corral {path}' repeats the epilog of 'corral {seen[cmd.epilog]}'"
        seen[cmd.epilog] = path
    assert len(seen) >= 15


@pytest.mark.parametrize(("path", "argument"), sorted(FORMATS))
def test_path_help_names_every_accepted_format(path: str, argument: str) -> None:
    cmd = COMMANDS[path]
    param = next(p for p in cmd.params if getattr(p, "metavar", None) == argument)
    text = (param.help or "").lower()
    wanted = ["gguf", "onnx", "safetensors" if path in ("inspect", "verify") else "hf"]
    wanted += [] if path == "license stamp" else ["demo:scout"]  # stamping works in place: not on the cache
    missing = [f for f in wanted if f not in text]
    assert not missing, f"corral {path} {argument}: help does not name {missing}"


def test_license_stamp_help_is_its_own(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    text = _help("license stamp", capsys)
    assert "(check:" not in text and "Replace an existing output" not in text
    assert "stamped in place" in next(p.help for p in COMMANDS["license stamp"].params if p.name == "path")


def test_choice_sets_have_one_definition() -> None:
    """Each closed set the CLI offers is the very object the implementing code checks against (defined once,
    in a light module), and the policy ids are the policy files."""
    from converters.gguf_mmproj import MMPROJ_OUTTYPES
    from converters.gguf_to_hf import OUT_DTYPES as GGUF_TO_HF
    from converters.onnx_export import DTYPES as ONNX
    from license.policy import policy_ids
    from license.stamp import RELATIONS
    from toolbox.cli import choices
    from toolbox.experts.forward import COMPUTE_DTYPES
    from toolbox.merge.merge import OUT_DTYPES as MERGE

    assert GGUF_TO_HF is MERGE and tuple(GGUF_TO_HF) == choices.HF_DTYPES
    assert choices.ONNX_DTYPES is ONNX and set(choices.CONVERT_DTYPES) == set(ONNX) | set(MERGE)
    assert choices.MMPROJ_OUTTYPES is MMPROJ_OUTTYPES and choices.COMPUTE_DTYPES is COMPUTE_DTYPES
    assert choices.RELATIONS is RELATIONS
    assert list(choices.POLICIES) == policy_ids() and policy_ids()


def test_experts_stats_has_top(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    text = _help("experts stats", capsys)
    assert "--top" in text and "--csv" in text
    assert not [p for p in COMMANDS["experts stats"].params if "--json" in getattr(p, "opts", ())]  # the global one
