"""Entry point of the `corral` console script: the one error boundary.

Known errors (CorralError and its subclasses) become one line plus a hint and their exit
code; usage errors exit 2; anything else is a corral bug, reported in one line with a
pointer to --verbose, which shows the traceback.
"""

from __future__ import annotations

import json
import sys

from toolbox.errors import CorralError, ExitCode


def _wants(flag: str, argv: list[str]) -> bool:
    return flag in argv[: argv.index("--")] if "--" in argv else flag in argv


def main(argv: list[str] | None = None) -> int:
    from toolbox.cli._typer import ClickAbort, ClickException, ClickExit
    from toolbox.cli.app import app, output_for

    args = list(sys.argv[1:] if argv is None else argv)
    verbose = _wants("--verbose", args) or _wants("-v", args)
    json_mode = _wants("--json", args)
    try:
        rv = app(args=args, prog_name="corral", standalone_mode=False)
        code = int(rv) if isinstance(rv, int) else 0
    except ClickExit as exc:
        code = exc.exit_code
    except ClickException as exc:  # usage errors: unknown option, missing argument, bad value
        exc.show()
        code = ExitCode.USAGE
    except CorralError as exc:
        out = output_for(verbose=verbose, json_mode=json_mode)
        if verbose:
            out.err.print_exception(show_locals=False)
        out.error(exc.message, exc.hint)
        if json_mode:
            sys.stdout.write(json.dumps(exc.to_dict(), indent=2) + "\n")
        code = exc.exit_code
    except (KeyboardInterrupt, ClickAbort):
        sys.stderr.write("interrupted\n")
        code = ExitCode.INTERRUPTED
    except Exception as exc:  # a bug in corral: say so in one line unless asked for more
        out = output_for(verbose=verbose, json_mode=json_mode)
        if verbose:
            out.err.print_exception(show_locals=False)
        out.error(
            f"internal error: {type(exc).__name__}: {exc}",
            None if verbose else "this is a bug in corral; rerun with --verbose for the traceback and report it",
        )
        code = ExitCode.INTERNAL
    return int(code)


def run() -> None:  # pragma: no cover - console script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
