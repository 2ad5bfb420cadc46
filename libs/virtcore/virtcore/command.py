"""What the three typer CLIs share: exit codes, output formats, the --version option, and
running an app so that every error is one plain line on stderr, never a traceback.

(ehost-device is not a typer CLI: it speaks the CNI protocol and must start lean.)
"""

from __future__ import annotations

import enum
import os
import sys
from typing import Any, Callable, List, Optional

import typer

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class Output(str, enum.Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


def version_option(prog: str, version: str) -> Any:
    """A `--version` typer option that prints `<prog> <version>` and exits 0."""

    def show(value: bool) -> None:
        if value:
            print(f"{prog} {version}")
            raise typer.Exit(EXIT_OK)

    return typer.Option(
        "--version", callback=show, is_eager=True, help="Print the version and exit."
    )


def _click_kind(e: BaseException) -> Optional[str]:
    # typer vendors click in recent releases and uses click itself in older ones: match by name.
    names = {c.__name__ for c in type(e).__mro__}
    for kind in ("NoArgsIsHelpError", "UsageError", "ClickException", "Abort", "Exit"):
        if kind in names:
            return kind
    return None


def run(app: Callable[..., Any], prog: str, argv: Optional[List[str]] = None) -> int:
    """Run a typer app and return its exit code: 0 ok, 1 failure, 2 usage or bad input."""

    def say(message: str) -> None:
        print(f"{prog}: {message}", file=sys.stderr)

    try:
        # Not standalone: usage errors come back here to be printed as one plain line.
        rv = app(args=argv, prog_name=prog, standalone_mode=False)
    except SystemExit as e:
        if e.code is None:
            return EXIT_OK
        return e.code if isinstance(e.code, int) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one line, never a traceback, for the operator
        kind = _click_kind(e)
        if kind == "NoArgsIsHelpError":
            ctx = getattr(e, "ctx", None)
            print(ctx.get_help() if ctx is not None else str(e), file=sys.stderr)
            return EXIT_USAGE
        if kind == "UsageError":
            ctx = getattr(e, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else ""
            say(f"usage error: {where}{e.format_message()} (see --help)")  # type: ignore[attr-defined]
            return EXIT_USAGE
        if kind == "ClickException":
            say(f"error: {e.format_message()}")  # type: ignore[attr-defined]
            return int(getattr(e, "exit_code", EXIT_FAILURE))
        if kind == "Abort":
            return 130
        if kind == "Exit":
            return int(getattr(e, "exit_code", EXIT_OK))
        if os.environ.get("VIRTDP_DEBUG"):
            raise
        say(f"internal error: {type(e).__name__}: {e} (set VIRTDP_DEBUG=1 for a traceback)")
        return EXIT_FAILURE
    return rv if isinstance(rv, int) else EXIT_OK
