"""virtdp-serve's command line: check every input, then run the daemon until SIGTERM/SIGINT.

Exit 0 after a clean stop, 2 on bad input (flags, config, metrics address, sysfs tree), checked
before any socket is created, 1 on an unexpected failure. Logs go to stderr; stdout stays empty.
"""

from __future__ import annotations

import enum
import logging
import re
import sys
from pathlib import Path
from typing import Annotated, Any, List, Optional, Tuple

import typer

from virtcore import claims, command, devinfo, discovery, pools
from virtcore.kubelet import registration
from virtdp_serve import __version__, logs, metrics

log = logging.getLogger("virtdp-serve")

EXIT_FAILURE = command.EXIT_FAILURE
EXIT_USAGE = command.EXIT_USAGE


class LogFormat(str, enum.Enum):
    text = "text"
    json = "json"


class Mode(str, enum.Enum):
    device_plugin = "device-plugin"
    dra = "dra"
    both = "both"


# Kubelet directories of the DRA plugin (the kubelet's defaults under --root-dir).
DEFAULT_REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"
DEFAULT_PLUGINS_DIR = "/var/lib/kubelet/plugins"
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


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
    mode: Annotated[
        Mode,
        typer.Option(
            "--mode",
            help="Serve pools through the device plugin API, through DRA, or both (then the "
            "pools named by --dra-pools go to DRA and the others stay device-plugin pools: no "
            "NIC is offered twice).",
        ),
    ] = Mode.device_plugin,
    dra_pools: Annotated[
        Optional[List[str]],
        typer.Option(
            "--dra-pools",
            metavar="POOL[,POOL]",
            help="With --mode both: the pools (resource names) served through DRA.",
        ),
    ] = None,
    dra_driver: Annotated[
        str,
        typer.Option("--dra-driver", metavar="NAME", help="DRA driver name (a DNS subdomain)."),
    ] = claims.DEFAULT_DRIVER,
    node_name: Annotated[
        Optional[str],
        typer.Option(
            "--node-name",
            envvar="NODE_NAME",
            metavar="NAME",
            help="This node's name (the DRA pool); default $NODE_NAME (downward API "
            "spec.nodeName). Required with DRA.",
        ),
    ] = None,
    dra_state_dir: Annotated[
        Path,
        typer.Option(
            "--dra-state-dir",
            metavar="DIR",
            help="The node-local claim record (claims.json) and the NICs' network status.",
        ),
    ] = Path(claims.DEFAULT_DIR),
    kubelet_registry_dir: Annotated[
        Path,
        typer.Option(
            "--kubelet-registry-dir",
            metavar="DIR",
            help="The kubelet's plugin registration directory (the DRA registration socket).",
        ),
    ] = Path(DEFAULT_REGISTRY_DIR),
    kubelet_plugins_dir: Annotated[
        Path,
        typer.Option(
            "--kubelet-plugins-dir",
            metavar="DIR",
            help="The kubelet's plugins directory (the DRA socket: <DIR>/<driver>/dra.sock).",
        ),
    ] = Path(DEFAULT_PLUGINS_DIR),
    kubeconfig: Annotated[
        Optional[Path],
        typer.Option(
            "--kubeconfig",
            metavar="FILE",
            help="API server credentials for DRA; default: the pod's ServiceAccount.",
        ),
    ] = None,
    dra_api_timeout: Annotated[
        float,
        typer.Option(
            "--dra-api-timeout",
            metavar="SECONDS",
            help="NodePrepareResources reads its claims from the API server within this time.",
        ),
    ] = 10.0,
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
    dra = None
    if mode != Mode.device_plugin:
        dra = _dra_options(
            mode=mode,
            cfg=cfg,
            dra_pools=dra_pools,
            driver=dra_driver,
            node=node_name,
            state_dir=dra_state_dir,
            registry_dir=kubelet_registry_dir,
            plugins_dir=kubelet_plugins_dir,
            kubeconfig=kubeconfig,
            api_timeout=dra_api_timeout,
        )
    elif dra_pools:
        raise _fail(EXIT_USAGE, "--dra-pools: only with --mode both")
    log.info(
        "virtdp-serve %s (%s): pools from %s: %s",
        __version__,
        mode.value,
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
            device_plugin=mode != Mode.dra,
            dra=dra,
        )
    except OSError as e:
        raise _fail(
            EXIT_USAGE, f"--metrics-address {metrics_address}: cannot listen: {e}"
        ) from None
    try:
        daemon.start()
    except claims.ClaimRecordError as e:
        daemon.shutdown()
        raise _fail(
            EXIT_USAGE,
            f"DRA claim record: {e}; it is left as it is (its claims may be in use): repair or "
            "move it away to start with an empty record",
        ) from None
    except (discovery.DiscoveryError, ServeError, OSError) as e:
        daemon.shutdown()
        raise _fail(EXIT_USAGE if isinstance(e, ServeError) else EXIT_FAILURE, str(e)) from None
    code = daemon.run()
    log.info("stopped")
    raise typer.Exit(code)


def _dra_options(
    *,
    mode: Mode,
    cfg: pools.Config,
    dra_pools: Optional[List[str]],
    driver: str,
    node: Optional[str],
    state_dir: Path,
    registry_dir: Path,
    plugins_dir: Path,
    kubeconfig: Optional[Path],
    api_timeout: float,
) -> Any:
    """Check the DRA flags (exit 2 naming the flag) and connect the API client."""
    from virtcore import kubeapi
    from virtdp_serve.daemon import DraOptions

    if len(driver) > 63 or not _DNS_SUBDOMAIN.fullmatch(driver):
        raise _fail(
            EXIT_USAGE,
            f"--dra-driver {driver!r}: expected a lower-case DNS subdomain of at most 63 "
            "characters, such as virt.kernel.org",
        )
    if not node:
        raise _fail(
            EXIT_USAGE,
            "--node-name: missing (and $NODE_NAME is unset); expected this node's name, e.g. "
            "from the downward API (fieldRef spec.nodeName)",
        )
    if len(node) > 253 or not _DNS_SUBDOMAIN.fullmatch(node):
        raise _fail(
            EXIT_USAGE, f"--node-name {node!r}: expected a node name (a lower-case DNS subdomain)"
        )
    names = [n.strip() for item in dra_pools or [] for n in item.split(",") if n.strip()]
    wanted: Optional[Tuple[str, ...]] = None
    if mode == Mode.both:
        if not names:
            raise _fail(
                EXIT_USAGE,
                "--mode both: --dra-pools is missing; expected the pools served through DRA "
                "(the others stay device-plugin pools)",
            )
        known = {p.resource_name for p in cfg.pools}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise _fail(
                EXIT_USAGE,
                f"--dra-pools {', '.join(unknown)}: no such pool in {cfg.source}; expected one "
                f"of {', '.join(sorted(known))}",
            )
        wanted = tuple(names)
    elif names:
        raise _fail(EXIT_USAGE, "--dra-pools: only with --mode both (--mode dra serves all pools)")
    for flag, path in (
        ("--dra-state-dir", state_dir),
        ("--kubelet-registry-dir", registry_dir),
        ("--kubelet-plugins-dir", plugins_dir),
    ):
        if path.exists() and not path.is_dir():
            raise _fail(EXIT_USAGE, f"{flag} {path}: not a directory")
    if not 0.1 <= api_timeout <= 40:
        raise _fail(
            EXIT_USAGE,
            f"--dra-api-timeout {api_timeout:g}: expected seconds between 0.1 and 40 (the "
            "kubelet gives NodePrepareResources 45 s)",
        )
    try:
        kube = kubeapi.connect(str(kubeconfig) if kubeconfig is not None else None)
    except kubeapi.KubeConfigError as e:
        raise _fail(EXIT_USAGE, f"API server: {e}") from None
    log.info("DRA driver %s on node %s; API server %s (%s)", driver, node, kube.host, kube.source)
    return DraOptions(
        driver=driver,
        node=node,
        registry_dir=str(registry_dir),
        plugins_dir=str(plugins_dir),
        state_dir=str(state_dir),
        pools=wanted,
        kube=kube,
        api_timeout=api_timeout,
    )


def main(argv: Optional[List[str]] = None) -> int:
    return command.run(app, "virtdp-serve", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
