"""The one place that imports Typer and its Click layer.

Typer 0.26+ (the pinned range) vendors Click as `typer._click` and defines Abort/Exit itself.
Everything else in corral imports these names from here, so a Typer upgrade touches one file.

It also fixes how help names a value: Typer renders Python type names (`<bool>` on every
flag, `<list[float]>`, `<str>`, `{PATH}` in the usage line). Here a flag shows nothing, a
closed set shows its choices (or its metavar when it is long), and everything else a plain
upper-case word (TEXT, INTEGER, FLOAT, PATH), as Click itself does.
"""

from __future__ import annotations

from typing import Any

import typer
from typer._click.exceptions import BadParameter as ClickBadParameter
from typer._click.exceptions import ClickException
from typer._click.exceptions import UsageError as ClickUsageError
from typer.core import TyperArgument, TyperOption

ClickAbort = typer.Abort
ClickExit = typer.Exit

MAX_INLINE_CHOICES = 6  # more choices than this: the help text lists them, the type column shows a word
_WORDS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "bool": "BOOLEAN", "path": "PATH", "file": "FILE",
          "dir": "DIR"}


def choices_of(param: Any) -> tuple[str, ...]:
    """The closed set a parameter accepts (empty when it is not one)."""
    desc = getattr(param, "type_descriptor", None)
    if desc is None or not desc.is_choice or not desc.choices:
        return ()
    return tuple(str(getattr(c, "value", c)) for c in desc.choices)


def value_word(param: Any) -> str | None:
    """What help shows for a parameter's value: None for a flag, choices, or one upper-case word."""
    if isinstance(param, TyperOption) and (param.is_flag or param.count):
        return None
    choices = choices_of(param)
    if choices:
        return "|".join(choices) if len(choices) <= MAX_INLINE_CHOICES else (param.name or "value").upper()
    desc = param.type_descriptor
    if desc.is_path:
        label = desc.path_type
    else:
        annotation = desc.annotation
        if desc.is_list:
            args = getattr(annotation, "__args__", None) or (str,)
            annotation = args[0]
        label = getattr(annotation, "__name__", "str")
    return _WORDS.get(str(label).lower(), str(label).upper())


def _option_type(self: TyperOption, ctx: Any) -> str | None:
    if self.metavar is not None:
        return str(self.metavar)
    word = value_word(self)
    return f"{word}..." if word is not None and self.nargs != 1 else word


def _argument_type(self: TyperArgument, ctx: Any) -> str | None:
    return None  # the argument's name (its metavar) already says what it is


def _argument_usage(self: TyperArgument) -> str:
    name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
    return name if self.nargs == 1 or name.endswith("...") else f"{name}..."


TyperOption.display_type_rich = _option_type  # type: ignore[method-assign]
TyperArgument.display_type_rich = _argument_type  # type: ignore[method-assign]
TyperArgument._usage_display_name = _argument_usage  # type: ignore[method-assign]

__all__ = ["ClickAbort", "ClickBadParameter", "ClickException", "ClickExit", "ClickUsageError", "choices_of",
           "typer", "value_word"]
