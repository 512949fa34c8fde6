"""Only a bare `owner/name` in the Hub's repo-id grammar is fetched from the Hub; a path-shaped name that does
not exist (`./x/y`, `/abs`, `../x`, `a/b/c`, `owner/model.safetensors`) is a missing file: exit 3 naming it
(README, Exit codes), not the network failure (exit 4) of a download that should never have started.

The Hub endpoint is pointed at a closed local port, so a name that did go to the Hub fails with exit 4: the
bare `owner/name` cases check that the rule still sends repo ids there. huggingface_hub's own validator is the
reference for the grammar.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from huggingface_hub.utils import HFValidationError, validate_repo_id

from toolbox.cli.main import main
from toolbox.errors import BadInputError, CorralError
from toolbox.reference import is_hub_id

DECL = "below-700m"
PATH_SHAPED = ["./no/such/dir", "./ab/cd", "/abs/missing", "../x", "a/b/c", "~/nope/x", "owner/model.safetensors",
               "owner/model.gguf", "owner/export.onnx", "owner/config.json", ".hidden/name"]
NOT_HUB = ["owner--x/name", "owner/na..me", "owner/name.git", "owner/-name", "owner/name.", "x" * 97 + "/name",
           "owner/na me", "single"]
HUB = ["meta-llama/Llama-4-Scout-17B-16E-Instruct", "acme/scout-ft.v2", "a/b", "org_1/model_2"]


@pytest.fixture
def closed_hub(monkeypatch: pytest.MonkeyPatch) -> str:
    """HF_ENDPOINT at a local port nothing listens on: a download attempt fails at once, with exit 4."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return url


def _hf_accepts(text: str) -> bool:
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


@pytest.mark.parametrize("text", PATH_SHAPED + NOT_HUB)
def test_path_shaped_and_invalid_names_are_not_hub_ids(text: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id(text)


@pytest.mark.parametrize("text", NOT_HUB[:-1])
def test_names_the_hub_refuses_are_not_hub_ids(text: str) -> None:
    assert not _hf_accepts(text)  # the reference agrees that these are not repo ids (`single` has no owner)


@pytest.mark.parametrize("text", HUB)
def test_bare_owner_name_is_a_hub_id_unless_it_exists(text: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _hf_accepts(text) and is_hub_id(text)
    assert not is_hub_id(Path(text))  # a Path object names a path (huggingface_hub says the same)
    (tmp_path / text).mkdir(parents=True)
    assert not is_hub_id(text)  # an existing directory of that name wins


@pytest.mark.parametrize("text", ["./ab/cd", "/abs/missing", "../x", "a/b/c", "owner/model.safetensors"])
def test_library_weight_merge_reports_the_missing_path(text: str, tmp_path: Path, monkeypatch, closed_hub) -> None:
    from license.stamp import LicenseOptions
    from toolbox.merge.weights import merge_weights

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CorralError) as err:
        merge_weights(text, ["demo:scout"], tmp_path / "out", method="linear",
                      license_options=LicenseOptions(mau_declaration=DECL))
    assert isinstance(err.value, BadInputError) and int(err.value.exit_code) == 3, err.value
    assert str(Path(text)) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["./ab/cd", "/abs/missing", "../x", "a/b/c", "owner/model.safetensors"])
def test_cli_merge_inputs_report_the_missing_path(text: str, tmp_path: Path, monkeypatch, closed_hub,
                                                  capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for args in (["merge", "demo:scout", text], ["merge", "--method", "linear", text, "demo:scout"],
                 ["merge", "--method", "linear", "demo:scout", text]):
        assert main([*args, "-o", str(tmp_path / "out"), "--mau-declaration", DECL]) == 3, args
        err = capsys.readouterr().err.strip().splitlines()
        assert str(Path(text)) in err[0] and "huggingface" not in " ".join(err).lower(), (args, err)
        assert not (tmp_path / "out").exists()


def test_bare_owner_name_still_goes_to_the_hub(tmp_path: Path, monkeypatch, closed_hub, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "demo:scout", "acme/scout-lora", "-o", str(tmp_path / "out"),
                 "--mau-declaration", DECL]) == 4
    err = capsys.readouterr().err
    assert "acme/scout-lora" in err and closed_hub.split("//")[1] in err
