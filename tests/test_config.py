"""`corral config`: user and project settings, precedence flag > env > project > user, origins shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from license_corpus import gguf_file

from toolbox.cli.main import main


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """An empty user config home and a project directory (with a subdirectory as the cwd)."""
    home = tmp_path / "xdg"
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)
    monkeypatch.chdir(project / "sub")
    return home, project


def _list(capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, str | None]]:
    capsys.readouterr()
    assert main(["--json", "config", "list"]) == 0
    return {r["key"]: r for r in json.loads(capsys.readouterr().out)["settings"]}


def test_precedence_and_origins(places: tuple[Path, Path], capsys, monkeypatch) -> None:
    home, project = places
    assert main(["config", "set", "mau_declaration", "below-700m"]) == 0
    user = home / "corral" / "config.toml"
    assert user.read_text().splitlines()[-1] == 'mau_declaration = "below-700m"'
    assert _list(capsys)["mau_declaration"]["origin"] == f"user {user}"
    (project / "corral.toml").write_text('mau_declaration = "meta-license:ACME-1"\n')  # found from sub/
    row = _list(capsys)["mau_declaration"]
    assert row["value"] == "meta-license:ACME-1" and row["origin"] == f"project {project / 'corral.toml'}"
    monkeypatch.setenv("CORRAL_MAU_DECLARATION", "meta-license:ENV-2")
    assert _list(capsys)["mau_declaration"]["origin"] == "env CORRAL_MAU_DECLARATION"
    capsys.readouterr()
    assert main(["--json", "config", "get", "mau_declaration"]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == "meta-license:ENV-2"
    monkeypatch.delenv("CORRAL_MAU_DECLARATION")
    assert main(["config", "unset", "mau_declaration", "--project"]) == 0
    assert main(["config", "unset", "mau_declaration"]) == 0
    assert _list(capsys)["mau_declaration"]["value"] is None
    assert main(["config", "get", "mau_declaration"]) == 1


def test_a_setting_reaches_a_write_and_a_flag_beats_it(places, tmp_path: Path, capsys) -> None:
    path = gguf_file(tmp_path / "Llama-4-cfg.gguf", {"general.name": "Llama-4-cfg"})
    assert main(["license", "stamp", str(path)]) == 5  # no declaration anywhere: refused
    capsys.readouterr()
    assert main(["config", "set", "mau_declaration", "below-700m", "--project"]) == 0
    capsys.readouterr()
    assert main(["--json", "license", "stamp", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["declaration"] == "below-700m"
    assert main(["--json", "license", "stamp", str(path), "--mau-declaration", "meta-license:FLAG-3"]) == 0
    assert json.loads(capsys.readouterr().out)["declaration"] == "meta-license:FLAG-3"
    import os

    assert "CORRAL_MAU_DECLARATION" not in os.environ  # applied for the command only


def test_bad_values_and_files_are_refused(places, capsys) -> None:
    home, project = places
    assert main(["config", "set", "mau_declaration", "above-700m"]) == 5  # checked now, not at the next write
    assert main(["config", "set", "mau_declaraton", "below-700m"]) == 2
    assert "did you mean 'mau_declaration'?" in capsys.readouterr().err
    assert not (home / "corral" / "config.toml").exists()
    (project / "corral.toml").write_text("mau_declaration = [1, 2]\n")
    assert main(["inspect", "demo:scout"]) == 3
    err = capsys.readouterr().err
    assert f"{project / 'corral.toml'}: mau_declaration must be a string" in err
    (project / "corral.toml").write_text("colour = 'blue'\n")
    assert main(["--json", "inspect", "demo:scout"]) == 3
    assert "unknown setting 'colour'" in json.loads(capsys.readouterr().out)["message"]
    (project / "corral.toml").write_text("not toml [\n")
    assert main(["config", "list"]) == 3  # names the file; `config unset` can still rewrite it
    assert "not valid TOML" in capsys.readouterr().err


def test_written_toml_round_trips_awkward_values(places) -> None:
    import tomllib

    from toolbox.settings import dumps

    values = {"cache_dir": 'C:\\cache "quoted" é\t'}
    assert tomllib.loads(dumps(values)) == values


def test_cache_dir_setting_moves_the_cache(places, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("CORRAL_CACHE_DIR")  # the environment would win (the test suite sets it)
    assert main(["config", "set", "cache_dir", str(tmp_path / "elsewhere")]) == 0
    capsys.readouterr()
    assert main(["--json", "cache", "info"]) == 0
    assert json.loads(capsys.readouterr().out)["root"] == str(tmp_path / "elsewhere")
