"""corral's persistent settings: a user file and a project file, below flags and the environment.

Precedence, highest first: a command-line flag, the environment variable, the project file
(`corral.toml` in the current directory or the nearest parent), the user file
(`$XDG_CONFIG_HOME/corral/config.toml`, default `~/.config/corral/config.toml`). Both files are
flat TOML tables of string values (`mau_declaration = "below-700m"`). A setting reaches every
command and library call through its environment variable, set only for the duration of one
command and only where the environment does not already hold one, so flags and the environment
keep winning and scripts calling the library see the same values.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from toolbox.errors import BadInputError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROJECT_FILE = "corral.toml"
MAX_FILE_BYTES = 64 * 1024  # a settings file is a few lines; anything larger is not one
MAX_VALUE_CHARS = 4096
MAX_PARENTS = 64  # directories searched upward for corral.toml


@dataclass(frozen=True)
class Key:
    name: str
    env: str
    help: str


KEYS: dict[str, Key] = {k.name: k for k in (
    Key("mau_declaration", "CORRAL_MAU_DECLARATION",
        "your declaration about the Llama license's 700M MAU threshold: below-700m or meta-license:REFERENCE"),
    Key("cache_dir", "CORRAL_CACHE_DIR", "where demos, recipe steps and downloads' partials are kept"),
    Key("executor", "CORRAL_EXECUTOR", "where recipe steps run: local (threads, the default) or ray (a Ray cluster)"),
)}


class SettingsFileError(BadInputError):
    """A settings file that is not a flat TOML table of known string keys (exit 3)."""


@dataclass(frozen=True)
class Setting:
    key: str
    value: str
    origin: str  # "env CORRAL_X", "project /path/corral.toml", "user /path/config.toml"


def user_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "corral" / "config.toml"


def project_file(start: Path | None = None) -> Path | None:
    """The nearest corral.toml from `start` (default: the current directory) upward, or None."""
    here = (start or Path.cwd()).absolute()
    for directory in [here, *here.parents][:MAX_PARENTS]:
        candidate = directory / PROJECT_FILE
        if candidate.is_file():
            return candidate
    return None


def read_file(path: Path) -> dict[str, str]:
    """A settings file's values; SettingsFileError naming the file and key when it is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SettingsFileError(f"{path}: cannot read settings: {exc.strerror or exc}", path=path) from None
    if len(raw) > MAX_FILE_BYTES:
        raise SettingsFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes: not a corral settings file", path=path)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsFileError(f"{path}: not valid TOML: {exc}", path=path,
                                hint="fix or remove the file (corral config unset KEY rewrites it)") from None
    values: dict[str, str] = {}
    for key, value in data.items():
        if key not in KEYS:
            raise SettingsFileError(f"{path}: unknown setting {key!r}", path=path,
                                    hint=f"known settings: {', '.join(KEYS)}")
        if not isinstance(value, str) or len(value) > MAX_VALUE_CHARS:
            raise SettingsFileError(f"{path}: {key} must be a string (of at most {MAX_VALUE_CHARS} characters)",
                                    path=path, hint=f'write it as {key} = "VALUE"')
        values[key] = value
    return values


def dumps(values: dict[str, str]) -> str:
    """Flat TOML for string values (a JSON string is a valid TOML basic string)."""
    lines = ["# corral settings (corral config set/unset KEY ...)"]
    lines += [f"{key} = {json.dumps(value, ensure_ascii=False)}" for key, value in sorted(values.items())]
    return "\n".join(lines) + "\n"


def check_key(key: str) -> Key:
    if key not in KEYS:
        import difflib

        near = difflib.get_close_matches(key, KEYS, n=1)
        raise UsageError(f"unknown setting {key!r}", hint=(f"did you mean {near[0]!r}? " if near else "") +
                         f"known settings: {', '.join(KEYS)}")
    return KEYS[key]


def resolved(start: Path | None = None) -> dict[str, Setting]:
    """Every setting that has a value, with where it comes from (environment > project > user)."""
    found: dict[str, Setting] = {}
    user = user_file()
    for key, value in read_file(user).items():
        found[key] = Setting(key, value, f"user {user}")
    project = project_file(start)
    if project is not None:
        for key, value in read_file(project).items():
            found[key] = Setting(key, value, f"project {project}")
    for key, spec in KEYS.items():
        env = os.environ.get(spec.env)
        if env:
            found[key] = Setting(key, env, f"env {spec.env}")
    return found


@contextmanager
def applied() -> Iterator[dict[str, Setting]]:
    """For one command: each file setting exported as its environment variable where none is set."""
    settings = resolved()
    added = []
    for setting in settings.values():
        env = KEYS[setting.key].env
        if not os.environ.get(env):
            os.environ[env] = setting.value
            added.append(env)
    try:
        yield settings
    finally:
        for env in added:
            os.environ.pop(env, None)
