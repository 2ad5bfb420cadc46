"""virtdp-serve's command line: check every input, then run the daemon until SIGTERM/SIGINT.

Exit 0 after a clean stop, 2 on bad input (flags, config, metrics address, sysfs tree), checked
before any socket is created, 1 on an unexpected failure. Logs go to stderr; stdout stays empty.
"""

from __future__ import annotations

import enum
import logging
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from virtcore import command, devinfo, discovery, pools
from virtcore.kubelet import registration
from virtdp_serve import __version__, logs, metrics

log = logging.getLogger("virtdp-serve")

EXIT_FAILURE = command.EXIT_FAILURE
EXIT_USAGE = command.EXIT_USAGE


class LogFormat(str, enum.Enum):
    text = "text"
    json = "json"


def _fail(code: int, message: str) -> typer.Exit:
    log.error("%s", message)
    return typer.Exit(code)


app = command.app()


@app.command(help="Advertise this node's virtio NICs to the kubelet as device plugin pools.")
def run(
    config: Annotated[
        Optional[Path],
        command.config_option(
            "reloaded when it changes (inotify on its directory, so a ConfigMap update is "
            "seen) and on SIGHUP"
        ),
    ] = None,
    device_plugin_dir: Annotated[
        Path,
        typer.Option(
            "--device-plugin-dir",
            metavar="DIR",
            help="The kubelet's device plugin directory (kubelet.sock and plugin sockets).",
        ),
    ] = Path(registration.DEFAULT_DEVICE_PLUGIN_DIR),
    devinfo_dir: Annotated[
        Path,
        typer.Option(
            "--devinfo-dir",
            metavar="DIR",
            help="Where device-info files for Multus are written (created if missing).",
        ),
    ] = Path(devinfo.DEFAULT_DIR),
    sysfs_root: command.SysfsRootOpt = Path("/sys"),
    metrics_address: Annotated[
        Optional[str],
        typer.Option(
            "--metrics-address",
            metavar="HOST:PORT",
            help="Serve Prometheus /metrics, /healthz and /readyz here (off by default).",
        ),
    ] = None,
    resync_interval: Annotated[
        float,
        typer.Option(
            "--resync-interval",
            metavar="SECONDS",
            help="Full rescan this often, a safety net: kernel events drive the inventory.",
        ),
    ] = 60.0,
    event_buffer: Annotated[
        int,
        typer.Option(
            "--event-buffer",
            metavar="BYTES",
            help="Receive buffer of each kernel event socket; an overflow costs a full rescan.",
        ),
    ] = 4
    << 20,
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="Log lines as text or json.")
    ] = LogFormat.text,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose", "-v", count=True, show_default=False, help="Debug logs (-vv: library too)."
        ),
    ] = 0,
    version: Annotated[bool, command.version_option("virtdp-serve", __version__)] = False,
) -> None:
    logs.setup(log_format.value, verbose)
    # Imported after logging is set up: these imports are the heavy part.
    from virtdp_serve.daemon import Daemon
    from virtdp_serve.plugin import ServeError

    try:
        cfg = pools.load_config(str(config) if config is not None else None)
    except pools.ConfigError as e:
        raise _fail(EXIT_USAGE, f"config error: {e}") from None
    if device_plugin_dir.exists() and not device_plugin_dir.is_dir():
        raise _fail(EXIT_USAGE, f"--device-plugin-dir {device_plugin_dir}: not a directory")
    if devinfo_dir.exists() and not devinfo_dir.is_dir():
        raise _fail(EXIT_USAGE, f"--devinfo-dir {devinfo_dir}: not a directory")
    if not 0.1 <= resync_interval <= 86400:
        raise _fail(
            EXIT_USAGE,
            f"--resync-interval {resync_interval:g}: expected seconds between 0.1 and 86400",
        )
    if not 4096 <= event_buffer <= 1 << 30:
        raise _fail(
            EXIT_USAGE, f"--event-buffer {event_buffer}: expected bytes between 4096 and 1073741824"
        )
    if metrics_address is not None:
        try:
            metrics.parse_address(metrics_address)
        except ValueError as e:
            raise _fail(EXIT_USAGE, f"--metrics-address {e}") from None
    log.info(
        "virtdp-serve %s: pools from %s: %s",
        __version__,
        cfg.source,
        ", ".join(p.resource_name for p in cfg.pools),
    )
    try:
        daemon = Daemon(
            config=cfg,
            config_path=str(config) if config is not None else None,
            device_plugin_dir=str(device_plugin_dir),
            devinfo_dir=str(devinfo_dir),
            sysfs_root=str(sysfs_root),
            metrics_address=metrics_address,
            resync_interval=resync_interval,
            event_buffer=event_buffer,
        )
    except OSError as e:
        raise _fail(
            EXIT_USAGE, f"--metrics-address {metrics_address}: cannot listen: {e}"
        ) from None
    try:
        daemon.start()
    except (discovery.DiscoveryError, ServeError, OSError) as e:
        daemon.shutdown()
        raise _fail(EXIT_USAGE if isinstance(e, ServeError) else EXIT_FAILURE, str(e)) from None
    code = daemon.run()
    log.info("stopped")
    raise typer.Exit(code)


def main(argv: Optional[List[str]] = None) -> int:
    return command.run(app, "virtdp-serve", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
