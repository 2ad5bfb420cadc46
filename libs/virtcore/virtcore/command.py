"""What the three typer CLIs share: the app itself (plain help), exit codes, output formats, the
options they have in common (--config, --sysfs-root, --netns, -o, --version), and running an app
so that every error is one plain line on stderr, never a traceback.

(ehost-device is not a typer CLI: it speaks the CNI protocol and must start lean.)
"""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, List, Optional

import typer

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class Output(str, enum.Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


def app(*, help: Optional[str] = None, no_args_is_help: bool = False) -> typer.Typer:
    """A typer app with click's plain help: typer's rich help panel shows a `<bool>` value after
    every on/off flag (as if `--verbose true` were the way to pass one) and cuts long defaults
    at the terminal's width; the plain one wraps them."""
    return typer.Typer(
        help=help,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        no_args_is_help=no_args_is_help,
    )


def _sysfs_tree(value: Path) -> Path:
    if not (value / "bus" / "pci" / "devices").is_dir():
        raise typer.BadParameter(
            f"{value} is not a sysfs tree (no bus/pci/devices), expected /sys or a captured tree"
        )
    return value


def config_option(note: str = "") -> Any:
    """--config FILE, the pool config; `note` says more about how the tool reads it."""
    more = f", {note}" if note else ""
    return typer.Option(
        "--config",
        metavar="FILE",
        help=f"Pool config (YAML){more}. Default: one pool kernel.org/virt of all eligible NICs.",
    )


ConfigOpt = Annotated[Optional[Path], config_option()]
SysfsRootOpt = Annotated[
    Path,
    typer.Option(
        "--sysfs-root",
        metavar="DIR",
        callback=_sysfs_tree,
        help="sysfs tree to read (a captured or fake one).",
    ),
]
NetnsOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--netns",
        metavar="PATH",
        exists=True,
        dir_okay=False,
        help="The host network namespace to read links and routes in, when not the one this "
        "runs in (e.g. /var/run/netns/x; never created).",
    ),
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table, json or yaml.")]


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
