"""Entry point of the `corral` console script: the one error boundary.

Known errors (CorralError and its subclasses) become one line plus a hint and their exit
code; usage errors exit 2; an OSError (disk full, permission, read-only, name too long...)
becomes the documented error for its errno; anything else is a corral bug, reported in one
line with a pointer to --verbose, which shows the traceback. With --json every exit, errors
included, also prints one JSON document on stdout.
"""

from __future__ import annotations

import json
import sys

from toolbox.errors import CorralError, ExitCode, InternalError, Interrupted, UsageError, from_os_error


def _wants(flag: str, argv: list[str]) -> bool:
    return flag in argv[: argv.index("--")] if "--" in argv else flag in argv


def main(argv: list[str] | None = None) -> int:
    from toolbox.cli._typer import ClickAbort, ClickException, ClickExit

    args = list(sys.argv[1:] if argv is None else argv)
    verbose = _wants("--verbose", args) or _wants("-v", args)
    json_mode = _wants("--json", args)
    if json_mode and _wants("--version", args):  # the one JSON document, as for every other exit
        from toolbox import __version__

        sys.stdout.write(json.dumps({"name": "corral", "version": __version__}) + "\n")
        return 0
    try:
        from toolbox.cli.app import app

        rv = app(args=args, prog_name="corral", standalone_mode=False)
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
        os_error = _os_error_in(exc)
        if os_error is not None:  # the environment refused (disk full, permission, ...), not a bug
            return _fail(from_os_error(os_error), verbose=verbose, json_mode=json_mode)
        return _fail(InternalError(f"internal error: {type(exc).__name__}: {exc}", hint=None if verbose else
                                   "this is a bug in corral; rerun with --verbose for the traceback and report it"),
                     verbose=verbose, json_mode=json_mode)


def _usage_error(exc: Exception) -> CorralError:
    """Click's usage error as one line plus a hint naming the command's --help."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    ctx = getattr(exc, "ctx", None)
    hint = f"see '{ctx.command_path} --help'" if ctx is not None else "see 'corral --help'"
    return UsageError(message or "invalid command line", hint=hint)


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
