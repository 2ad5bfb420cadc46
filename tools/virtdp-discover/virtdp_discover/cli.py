"""virtdp-discover's command line: load the pool config, discover, assign pools, print.

stdout carries the inventory only; logs and errors go to stderr. Exit 0 on success, 1 when
discovery fails, 2 on a usage or config error.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any, List, Mapping, Optional

import typer

from virtcore import command, discovery, pools, render
from virtdp_discover import __version__

log = logging.getLogger("virtdp-discover")

EXIT_FAILURE = command.EXIT_FAILURE
EXIT_USAGE = command.EXIT_USAGE


Output = command.Output


def _ifname(row: Mapping[str, Any]) -> str:
    return str(row["ifname"]) if row["visible"] else "(not here)"


def _link(row: Mapping[str, Any]) -> str:
    if not row["visible"]:
        return "-"
    carrier = {True: "carrier", False: "no-carrier", None: "carrier?"}[row["carrier"]]
    return f"{row['operstate'] or '?'}/{carrier}"


def _device(row: Mapping[str, Any]) -> str:
    model = {"0x1000": " legacy", "0x1041": " modern"}.get(row["device"] or "", "")
    return f"{render.cell(row['device'])}{model}"


def _status(row: Mapping[str, Any]) -> str:
    return "eligible" if row["eligible"] else f"excluded: {row['excluded_reason']}"


COLUMNS = [
    render.Column("pci_address", "PCI address"),
    render.Column("virtio_name", "virtio"),
    render.Column("driver", "driver"),
    render.Column("device", "device", _device),
    render.Column("numa_node", "NUMA"),
    render.Column("ifname", "ifname", _ifname),
    render.Column("mac", "MAC"),
    render.Column("mtu", "MTU"),
    render.Column("operstate", "link", _link),
    render.Column("default_route", "default route"),
    render.Column("pool", "pool"),
    render.Column("eligible", "status", _status),
]
PROBLEMS = render.Column("problems", "problems")


app = command.app()


@app.command(help="List this node's virtio NICs, whether each may be handed to pods, and its pool.")
def run(
    config: command.ConfigOpt = None,
    sysfs_root: command.SysfsRootOpt = Path("/sys"),
    netns: command.NetnsOpt = None,
    output: command.OutputOpt = Output.table,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False,
    version: Annotated[bool, command.version_option("virtdp-discover", __version__)] = False,
) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if verbose else logging.WARNING,
        format="virtdp-discover: %(levelname)s: %(message)s",
    )
    try:
        cfg = pools.load_config(str(config) if config is not None else None)
    except pools.ConfigError as e:
        print(f"virtdp-discover: config error: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    log.info("pools from %s: %s", cfg.source, ", ".join(p.resource_name for p in cfg.pools))
    started = time.perf_counter()
    try:
        nics = discovery.discover(str(sysfs_root), netns=str(netns) if netns else None)
    except discovery.DiscoveryError as e:
        print(f"virtdp-discover: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_FAILURE) from None
    nics = pools.assign(cfg, nics)
    log.info(
        "%d virtio NICs, %d eligible, in %.1f ms",
        len(nics),
        sum(n.eligible for n in nics),
        (time.perf_counter() - started) * 1000,
    )
    for nic in nics:
        for problem in nic.problems:
            log.info("%s: %s", nic.pci_address, problem)
    columns = COLUMNS + ([PROBLEMS] if any(n.problems for n in nics) else [])
    render.render(nics, columns, output.value, title="virtio NICs")


def main(argv: Optional[List[str]] = None) -> int:
    return command.run(app, "virtdp-discover", argv)
