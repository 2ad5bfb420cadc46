"""virtdp-inspect's command line: allocations, claims, devices, checkpoint, netns.

Each command gathers through virtcore (and this package's join helpers) and prints: a table, or
`-o json|yaml` with the keys documented in the README. stdout carries that data only; the
source that answered, warnings and errors go to stderr, one line each. Exit 0 on success, 1 when
what is inspected cannot be read (or fails its checks), 2 on a usage error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, List, Mapping, Optional, Sequence

import typer

from virtcore import checkpoint, command, discovery, plumbed, render
from virtcore import claims as claim_record
from virtcore.kubelet import podresources
from virtdp_inspect import __version__

PROG = "virtdp-inspect"
EXIT_FAILURE = command.EXIT_FAILURE
EXIT_USAGE = command.EXIT_USAGE
DEFAULT_TIMEOUT = 3.0


Output = command.Output


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _fail(message: str) -> typer.Exit:
    _say(f"error: {message}")
    return typer.Exit(EXIT_FAILURE)


def _emit(data: Any, output: Output) -> None:
    sys.stdout.write(render.dump(data, output.value))


def _table(rows: Sequence[Any], columns: Sequence[render.Column], title: str) -> None:
    if not sys.stdout.isatty():
        print(f"# {title}")
    render.render(rows, columns, "table", title=title)


# -- options ------------------------------------------------------------------------------------
def _timeout(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"{value:g} is not a positive number of seconds, expected e.g. 3")
    return value


OutputOpt = command.OutputOpt
SysfsOpt = command.SysfsRootOpt
NetnsOpt = command.NetnsOpt
TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout", metavar="SECONDS", callback=_timeout, help="Deadline of every connect and RPC."
    ),
]
NetnsDirOpt = Annotated[
    Path,
    typer.Option("--netns-dir", metavar="DIR", help="Where named network namespaces live."),
]
PodResourcesOpt = Annotated[
    Path,
    typer.Option(
        "--pod-resources-socket", metavar="SOCKET", help="The kubelet's pod-resources socket."
    ),
]
CheckpointOpt = Annotated[
    Path,
    typer.Option("--checkpoint", metavar="FILE", help="The kubelet's device-manager checkpoint."),
]
ResourceOpt = Annotated[
    Optional[List[str]],
    typer.Option("--resource", metavar="NAME", help="Only this resource (repeatable)."),
]

app = command.app(
    no_args_is_help=True,
    help="Debug virtdp on a node: allocations, plugin devices, the kubelet checkpoint, and where "
    "every plumbed NIC is.",
)


@app.callback()
def _root(
    version: Annotated[bool, command.version_option(PROG, __version__)] = False,
) -> None:
    pass


def _locator(sysfs_root: Path, netns: Optional[Path], netns_dir: Path) -> Any:
    """Where each NIC is now (virtdp_inspect.locate), and the problems met finding out."""
    from virtdp_inspect import locate

    return locate.build(
        str(sysfs_root),
        netns=str(netns) if netns else None,
        netns_dir=str(netns_dir),
        proc_root=plumbed.PROC_ROOT,
    )


# -- allocations ---------------------------------------------------------------------------------
def _where(row: Mapping[str, Any]) -> str:
    loc = row["location"]
    if loc == "host":
        return f"host: {row['ifname']}"
    if loc == "pod":
        was = f" (host {row['host_ifname']})" if row["host_ifname"] else ""
        return f"{row['netns']}: {row['ifname']}{was}"
    return str(loc)


def _pod(row: Mapping[str, Any]) -> str:
    if row["pod"] is not None:
        return f"{row['namespace']}/{row['pod']}"
    return f"uid {row['pod_uid']}"


ALLOC_COLUMNS = [
    render.Column("pod", "pod", _pod),
    render.Column("container", "container"),
    render.Column("resource", "resource"),
    render.Column("device_id", "device"),
    render.Column("claim", "claim"),
    render.Column("numa_node", "NUMA"),
    render.Column("location", "where", _where),
    render.Column("note", "note"),
]


@app.command(
    help="Which pod and container holds which NIC (device plugin and DRA), and where that NIC "
    "is now."
)
def allocations(
    pod_resources_socket: PodResourcesOpt = Path(podresources.DEFAULT_SOCKET),
    checkpoint_file: CheckpointOpt = Path(checkpoint.DEFAULT_PATH),
    resource: ResourceOpt = None,
    sysfs_root: SysfsOpt = Path("/sys"),
    netns: NetnsOpt = None,
    netns_dir: NetnsDirOpt = Path(plumbed.NETNS_DIR),
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
    output: OutputOpt = Output.table,
) -> None:
    from virtdp_inspect import allocations as alloc

    # Netlink first: reading other namespaces forks helpers, which gRPC threads dislike.
    locator, problems = _locator(sysfs_root, netns, netns_dir)
    try:
        source = alloc.gather(str(pod_resources_socket), str(checkpoint_file), timeout)
    except alloc.NoSource as e:
        raise _fail(str(e)) from None
    if source.name == alloc.SOURCE_API:
        _say(f"source: pod-resources API at {source.path}")
    else:
        _say(
            f"source: checkpoint {source.path} (pod-resources API not used: "
            f"{source.fallback_reason})"
        )
    for p in problems:
        _say(f"warning: {p}")
    rows = alloc.rows(source, locator, resource or ())
    if output is Output.table:
        _table(rows, ALLOC_COLUMNS, "allocations")
        return
    _emit(
        {
            "source": source.name,
            "source_path": source.path,
            "fallback_reason": source.fallback_reason,
            "allocations": rows,
            "problems": problems,
        },
        output,
    )


# -- claims --------------------------------------------------------------------------------------
def _claim_pods(row: Mapping[str, Any]) -> str:
    return ", ".join(row["pods"]) or "-"


def _claim_status(row: Mapping[str, Any]) -> str:
    s = row["status"]
    if not s:
        return "-"
    return f"{s['interface_name']} {' '.join(s['ips']) or '(no IP)'}"


def _claim_api(row: Mapping[str, Any]) -> str:
    a = row["api"]
    if a is None:
        return ""
    if a["error"]:
        return f"error: {a['error']}"
    parts = ["allocated" if a["allocated"] else "NOT allocated"]
    nd = a["network_data"]
    if nd:
        parts.append(f"status {nd.get('interfaceName', '?')} {' '.join(nd.get('ips') or [])}")
    else:
        parts.append("no device status")
    return ", ".join(parts)


CLAIM_COLUMNS = [
    render.Column("claim", "claim", lambda r: f"{r['namespace']}/{r['claim']}"),
    render.Column("pods", "pods", _claim_pods),
    render.Column("request", "request"),
    render.Column("device", "device"),
    render.Column("location", "where", _where),
    render.Column("status", "recorded status", _claim_status),
    render.Column("api", "API", _claim_api),
    render.Column("note", "note"),
]


@app.command(
    help="The DRA claims prepared on this node, their pods, where each claimed NIC is now and "
    "its recorded network status; with --kubeconfig, what the API says of each claim."
)
def claims(
    dra_state_dir: Annotated[
        Path,
        typer.Option("--dra-state-dir", metavar="DIR", help="virtdp-serve's DRA state directory."),
    ] = Path(claim_record.DEFAULT_DIR),
    kubeconfig: Annotated[
        Optional[Path],
        typer.Option(
            "--kubeconfig",
            metavar="FILE",
            exists=True,
            dir_okay=False,
            help="Also read each claim from the API server (allocation, device status).",
        ),
    ] = None,
    sysfs_root: SysfsOpt = Path("/sys"),
    netns: NetnsOpt = None,
    netns_dir: NetnsDirOpt = Path(plumbed.NETNS_DIR),
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
    output: OutputOpt = Output.table,
) -> None:
    from virtdp_inspect import prepared

    try:
        record = prepared.read(str(dra_state_dir))
    except claim_record.ClaimRecordError as e:
        raise _fail(str(e)) from None
    locator, problems = _locator(sysfs_root, netns, netns_dir)
    problems = list(record.problems) + problems
    api = None
    if kubeconfig is not None:
        from virtcore import kubeapi

        try:
            kube = kubeapi.connect(str(kubeconfig), timeout=(timeout, timeout))
        except kubeapi.KubeConfigError as e:
            raise _fail(str(e)) from None
        try:
            api = prepared.from_api(kube, record.prepared)
        finally:
            kube.close()
        _say(f"API: {kube.host} ({kube.source})")
    _say(
        f"{len(record.prepared)} prepared claims, {len(record.statuses)} network status files "
        f"in {record.directory}"
    )
    for p in problems:
        _say(f"warning: {p}")
    rows = prepared.rows(record, locator, api)
    if output is Output.table:
        _table(rows, CLAIM_COLUMNS, "prepared claims")
        return
    _emit(
        {
            "dra_state_dir": record.directory,
            "api": api is not None,
            "claims": rows,
            "problems": problems,
        },
        output,
    )


# -- devices -------------------------------------------------------------------------------------
DEVICE_COLUMNS = [
    render.Column("socket", "socket"),
    render.Column("resource", "resource"),
    render.Column("id", "device"),
    render.Column("health", "health"),
    render.Column("numa_nodes", "NUMA"),
    render.Column("status", "status"),
]


EXCLUDED_COLUMNS = [
    render.Column("pci_address", "PCI address"),
    render.Column("ifname", "ifname"),
    render.Column("reason", "why never advertised"),
]


def _excluded(sysfs_root: Path, netns: Optional[Path]) -> Optional[List[Any]]:
    """The node's virtio NICs that may not go to pods, by the rule virtdp-serve advertises with
    and ehost-device's ADD refuses with (None: discovery failed, said on stderr)."""
    try:
        nics = discovery.discover(str(sysfs_root), netns=str(netns) if netns else None)
    except discovery.DiscoveryError as e:
        _say(f"warning: discovery failed, NICs not advertised unknown: {e}")
        return None
    return [
        {"pci_address": n.pci_address, "ifname": n.ifname, "reason": n.excluded_reason}
        for n in nics
        if not n.eligible
    ]


@app.command(
    help="What each device plugin socket advertises, asked the way the kubelet asks, and which "
    "of the node's virtio NICs may not be advertised, and why."
)
def devices(
    device_plugin_dir: Annotated[
        Path,
        typer.Option("--device-plugin-dir", metavar="DIR", help="The kubelet's plugin directory."),
    ] = Path("/var/lib/kubelet/device-plugins"),
    pod_resources_socket: PodResourcesOpt = Path(podresources.DEFAULT_SOCKET),
    checkpoint_file: Annotated[
        Optional[Path],
        typer.Option(
            "--checkpoint",
            metavar="FILE",
            help="Checkpoint naming each resource's devices [default: in the plugin directory].",
        ),
    ] = None,
    sysfs_root: SysfsOpt = Path("/sys"),
    netns: NetnsOpt = None,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
    output: OutputOpt = Output.table,
) -> None:
    from virtdp_inspect import plugins

    excluded = _excluded(sysfs_root, netns)  # netlink before gRPC starts its threads

    directory = str(device_plugin_dir)
    if not device_plugin_dir.is_dir():
        what = "not a directory" if device_plugin_dir.exists() else "no such directory"
        raise _fail(f"{directory}: {what} (is the kubelet running? check --device-plugin-dir)")
    try:
        found = plugins.inspect(directory, timeout)
    except OSError as e:
        raise _fail(f"{directory}: cannot list: {e.strerror or e}") from None
    ck_path = str(checkpoint_file or os.path.join(directory, plugins.CHECKPOINT_NAME))
    if any(p.devices for p in found):
        known, src, notes = plugins.kubelet_resources(str(pod_resources_socket), ck_path, timeout)
        found = plugins.name_resources(found, known, src)
        if src is None:
            _say("warning: resource names unknown: " + "; ".join(notes))
    if not found:
        _say(f"no device plugin sockets in {directory}")
    failed = [p for p in found if p.status == plugins.FAILED]
    for p in found:
        if p.error:
            _say(("error: " if p.status == plugins.FAILED else "skipped: ") + p.error)
    if output is Output.table:
        rows = []
        for p in found:
            base = {"socket": os.path.basename(p.socket), "resource": p.resource}
            if p.status != plugins.OK:
                rows.append({**base, "status": p.status})
            elif not p.devices:
                rows.append({**base, "status": "ok, no devices"})
            for d in p.devices:
                rows.append({**base, **render.plain(d), "status": p.status})
        _table(rows, DEVICE_COLUMNS, "device plugins")
        if excluded is not None:
            _table(excluded, EXCLUDED_COLUMNS, "virtio NICs excluded")
    else:
        _emit(
            {"device_plugin_dir": directory, "plugins": found, "excluded": excluded},
            output,
        )
    if failed:
        raise typer.Exit(EXIT_FAILURE)


# -- checkpoint ----------------------------------------------------------------------------------
def _entry_devices(row: Mapping[str, Any]) -> str:
    return (
        ", ".join(
            d["id"] + (f" (NUMA {d['numa_node']})" if d["numa_node"] not in (None, -1) else "")
            for d in row["devices"]
        )
        or "-"
    )


ENTRY_COLUMNS = [
    render.Column("pod_uid", "pod UID"),
    render.Column("container", "container"),
    render.Column("resource", "resource"),
    render.Column("devices", "devices", _entry_devices),
]
REGISTERED_COLUMNS = [
    render.Column("resource", "resource"),
    render.Column("device_ids", "registered devices"),
]
FINDING_COLUMNS = [
    render.Column("severity", "severity"),
    render.Column("resource", "resource"),
    render.Column("device_id", "device"),
    render.Column("message", "finding"),
]


@app.command(
    "checkpoint", help="Print and sanity-check the kubelet's device checkpoint (never written)."
)
def checkpoint_(
    checkpoint_file: CheckpointOpt = Path(checkpoint.DEFAULT_PATH),
    resource: Annotated[
        Optional[List[str]],
        typer.Option(
            "--resource",
            metavar="NAME",
            help="Check this resource's IDs against the node's NICs (repeatable) [default: every "
            "resource whose IDs are all PCI addresses].",
        ),
    ] = None,
    sysfs_root: SysfsOpt = Path("/sys"),
    netns: NetnsOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    from virtdp_inspect import checkpoint_check

    try:
        ck = checkpoint.load(str(checkpoint_file))
    except checkpoint.CheckpointError as e:
        raise _fail(str(e)) from None
    nics: Optional[List[discovery.Nic]]
    try:
        nics = discovery.discover(str(sysfs_root), netns=str(netns) if netns else None)
    except discovery.DiscoveryError as e:
        nics = None
        _say(f"warning: discovery failed, IDs not checked against the node's NICs: {e}")
    checked = list(resource) if resource else checkpoint_check.nic_resources(ck)
    findings = checkpoint_check.check(ck, nics, checked)
    errors = sum(f.severity == checkpoint_check.ERROR for f in findings)
    if ck.format == checkpoint.FORMAT_FLAT:
        _say("note: flat DeviceIDs (written by Kubernetes 1.19 or older): no NUMA nodes recorded")
    _say(
        f"{len(ck.entries)} entries, {len(ck.registered_devices)} registered resources, "
        f"{errors} errors, {len(findings) - errors} warnings"
    )
    entries = [
        {
            "pod_uid": e.pod_uid,
            "container": e.container_name,
            "resource": e.resource_name,
            "devices": [{"id": d.id, "numa_node": d.numa_node} for d in e.devices],
            "envs": dict(e.envs),
            "annotations": dict(e.annotations),
        }
        for e in ck.entries
    ]
    registered = {r: list(ids) for r, ids in ck.registered_devices}
    if output is Output.table:
        _table(entries, ENTRY_COLUMNS, "entries")
        reg_rows = [{"resource": r, "device_ids": ids} for r, ids in registered.items()]
        _table(reg_rows, REGISTERED_COLUMNS, "registered devices")
        _table(findings, FINDING_COLUMNS, "findings")
    else:
        _emit(
            {
                "path": ck.source,
                "format": ck.format,
                "checksum": ck.checksum,
                "entries": entries,
                "registered_devices": registered,
                "checked_resources": checked,
                "findings": findings,
            },
            output,
        )
    if errors:
        raise typer.Exit(EXIT_FAILURE)


# -- netns ---------------------------------------------------------------------------------------
NETNS_COLUMNS = [
    render.Column("netns", "netns"),
    render.Column("ifname", "ifname"),
    render.Column("host_ifname", "host ifname"),
    render.Column("pci_address", "PCI address"),
    render.Column("mac", "MAC"),
    render.Column("operstate", "state"),
    render.Column("addresses", "addresses"),
]


@app.command(help="Every NIC ehost-device has plumbed, found by its mark, in every namespace.")
def netns(
    netns_dir: NetnsDirOpt = Path(plumbed.NETNS_DIR),
    output: OutputOpt = Output.table,
) -> None:
    scan = plumbed.scan(str(netns_dir), plumbed.PROC_ROOT)
    for p in scan.problems:
        _say(f"warning: {p}")
    _say(f"{len(scan.nics)} plumbed NICs in {len(scan.namespaces)} network namespaces")
    rows = [
        {
            "netns": n.netns.label,
            "netns_path": n.netns.path,
            "netns_inode": n.netns.inode,
            "pid": n.netns.pid,
            "ifname": n.ifname,
            "ifindex": n.ifindex,
            "host_ifname": n.host_ifname,
            "pci_address": n.pci_address,
            "mac": n.mac,
            "mtu": n.mtu,
            "operstate": n.operstate,
            "admin_up": n.admin_up,
            "addresses": list(n.addresses),
            "original_mtu": n.mark.mtu,
            "original_mac": n.mark.mac,
            "was_down": n.mark.was_down,
            # Taken by DRA claim (ehost_device.claimed): whose, and through which attachment.
            "pod_uid": n.mark.pod,
            "claim_uid": n.mark.claim,
            "attachment": n.mark.attachment,
        }
        for n in scan.nics
    ]
    if output is Output.table:
        _table(rows, NETNS_COLUMNS, "plumbed NICs")
        return
    _emit(
        {"namespaces_scanned": len(scan.namespaces), "nics": rows, "problems": list(scan.problems)},
        output,
    )


def main(argv: Optional[List[str]] = None) -> int:
    return command.run(app, PROG, argv)
