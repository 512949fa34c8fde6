"""Entry point of the `corral` console script: the one error boundary.

Known errors (CorralError and its subclasses) become one line plus a hint and their exit
code; usage errors exit 2; an OSError (disk full, permission, read-only, name too long...)
becomes the documented error for its errno; anything else is a corral bug, reported in one
line with a pointer to --verbose, which shows the traceback. With --json every exit, errors
included, also prints one JSON document on stdout.
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import AbstractContextManager, nullcontext

from toolbox.errors import CorralError, ExitCode, InternalError, Interrupted, UsageError, from_os_error


def _wants(flag: str, argv: list[str]) -> bool:
    return flag in argv[: argv.index("--")] if "--" in argv else flag in argv


def main(argv: list[str] | None = None) -> int:
    from toolbox.cli._typer import ClickAbort, ClickException, ClickExit
    from toolbox.cli.app import command, hoist_global_options

    cli = command()
    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv), cli)  # `inspect X --json` too
    verbose = _wants("--verbose", args) or _wants("-v", args)
    json_mode = _wants("--json", args)
    quiet = _wants("--quiet", args) or _wants("-q", args)
    if json_mode and _wants("--version", args):  # the one JSON document, as for every other exit
        from toolbox import __version__

        sys.stdout.write(json.dumps({"name": "corral", "version": __version__}) + "\n")
        return 0
    try:
        from toolbox.cli.thirdparty import third_party_output

        with third_party_output(verbose=verbose, quiet=quiet, progress=not _wants("--no-progress", args)), \
                _settings(args):
            rv = cli(args=args, prog_name="corral", standalone_mode=False)
        if rv == ExitCode.INTERRUPTED:  # Typer's own answer to Ctrl-C
            return _fail(Interrupted("interrupted"), verbose=False, json_mode=json_mode)
        return int(rv) if isinstance(rv, int) else 0
    except ClickExit as exc:  # --help, --version; Typer turns Ctrl-C into Exit(130)
        if exc.exit_code == ExitCode.INTERRUPTED:
            return _fail(Interrupted("interrupted"), verbose=False, json_mode=json_mode)
        return int(exc.exit_code)
    except ClickException as exc:  # usage errors: unknown option, missing argument, bad value
        return _fail(_usage_error(exc), verbose=verbose, json_mode=json_mode)
    except CorralError as exc:
        return _fail(exc, verbose=verbose, json_mode=json_mode)
    except (KeyboardInterrupt, ClickAbort):
        return _fail(Interrupted("interrupted"), verbose=False, json_mode=json_mode)
    except Exception as exc:
        from toolbox.cli.deps import as_missing_dependency

        missing = as_missing_dependency(exc)
        if missing is not None:  # an optional package the command needed: install hint, exit 2
            return _fail(missing, verbose=verbose, json_mode=json_mode)
        os_error = _os_error_in(exc)
        if os_error is not None:  # the environment refused (disk full, permission, ...), not a bug
            return _fail(from_os_error(os_error), verbose=verbose, json_mode=json_mode)
        return _fail(InternalError(f"internal error: {type(exc).__name__}: {exc}", hint=None if verbose else
                                   "this is a bug in corral; rerun with --verbose for the traceback and report it"),
                     verbose=verbose, json_mode=json_mode)


def _settings(args: list[str]) -> AbstractContextManager[object]:
    """The user's and project's settings for this command (not for `corral config`, which must work
    to repair a broken settings file)."""
    from toolbox.settings import applied

    noun = next((a for a in args if not a.startswith("-")), None)
    return nullcontext() if noun == "config" else applied()


def _usage_error(exc: Exception) -> CorralError:
    """Click's usage error as one line plus a hint naming the command's --help (and the nearest choice)."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = message.replace(": Value error, ", ": ")  # Typer's wording of a bad choice
    ctx = getattr(exc, "ctx", None)
    hint = f"see '{ctx.command_path} --help'" if ctx is not None else "see 'corral --help'"
    nearest = _nearest(exc, message)
    if nearest:
        hint = f"did you mean '{nearest}'? {hint}"
    return UsageError(message or "invalid command line", hint=hint)


_NOT_ONE_OF = re.compile(r"'([^']{1,200})' is not one of")


def _nearest(exc: Exception, message: str) -> str | None:
    """The closest accepted value to a mistyped choice (`--to ggfu` -> gguf)."""
    import difflib

    from toolbox.cli._typer import choices_of

    match = _NOT_ONE_OF.search(message)  # (Click itself suggests the nearest subcommand and option)
    candidates = choices_of(getattr(exc, "param", None)) if match else ()
    if match is None or not candidates:
        return None
    found = difflib.get_close_matches(match.group(1).lower(), candidates, n=1, cutoff=0.6)
    return found[0] if found else None


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError that caused `exc` (itself, or up to 8 links down its cause/context chain)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _fail(exc: CorralError, *, verbose: bool, json_mode: bool) -> int:
    """Report an error: one line (and a hint) on stderr, and in JSON mode one document on stdout."""
    from toolbox.cli.output import Output

    out = Output(json_mode=json_mode, verbose=verbose)
    try:
        if verbose and sys.exc_info()[0] is not None:
            out.err.print_exception(show_locals=False)
        out.error(exc.message, exc.hint)
        if json_mode:
            sys.stdout.write(json.dumps(exc.to_dict(), indent=2) + "\n")
            sys.stdout.flush()
    except (OSError, ValueError):  # stdout/stderr closed, full or not UTF-8: the exit code still says it
        pass
    return int(exc.exit_code)


def run() -> None:  # pragma: no cover - console script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
