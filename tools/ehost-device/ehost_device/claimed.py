"""NICs taken by DRA claim: the network config names no device, the pod's claims do.

virtdp-serve records, when the kubelet prepares a claim, which NICs the claim holds and for
which pods (`claims.json` in the node policy's `draStateDir`, virtcore.claims). The pod is
`K8S_POD_UID` from CNI_ARGS (containerd and CRI-O pass it). Two ways to be called:

- **Through a NAD without a resourceName** (no prevResult at ADD): one attachment, one NIC,
  named CNI_IFNAME: the claimed NIC whose claim names it CNI_IFNAME (`interfaceName`), else
  the first of the pod's claimed NICs (in `claims.for_pod` order) that its claim does not name
  and that is not in the pod yet. A pod with no claimed NIC left is an error.
- **Chained after the cluster network** (ADD with a prevResult): every claimed NIC of the pod,
  each named by its claim, else net1, net2, ... (skipping names in use); the answer is the
  prevResult plus the new interfaces, IPs and routes. A pod without a claim, or a call without
  K8S_POD_UID, passes through: the answer is the prevResult, as is.

Each NIC's mark (virtcore.alias) records the pod, the claim and the attachment (the ADD's
CNI_IFNAME), and each plumbed NIC gets a network status file (`claims.write_status`) that
virtdp-serve copies into the claim's status. DEL gives back every NIC of the attachment
wherever it is (in the pod, or on the host after the pod's namespace died), runs IPAM DEL
for each interface name, and removes its status file, in that order, NIC by NIC: a step that
fails leaves what the next DEL needs. Everything else is `plugin`'s: the node policy guard,
the per-NIC locks, the moves and their undo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

from ehost_device import caller, ipam, locks, plugin
from ehost_device import conf as cni
from ehost_device import result as res
from ehost_device.conf import CniError, Conf, Env
from virtcore import alias, claims, netns

log = logging.getLogger("ehost-device")

POD_UID = "K8S_POD_UID"

Held = Tuple[claims.PreparedClaim, claims.ClaimedDevice]


# -- the pod and its claims ---------------------------------------------------------------------


def cni_args(env: Env) -> Dict[str, str]:
    """CNI_ARGS as a mapping (`K=V;K2=V2`; libcni's format, no escaping)."""
    out = {}
    for item in env.args.split(";"):
        key, sep, value = item.partition("=")
        if sep and key:
            out[key.strip()] = value.strip()
    return out


def pod_uid(env: Env, *, strict: bool = True) -> Optional[str]:
    """The pod's UID from CNI_ARGS, None if absent. A value that is not a UID is an error
    (`strict`) or, for DEL, ignored."""
    uid = cni_args(env).get(POD_UID) or None
    if uid is not None and not claims.is_uid(uid):
        if strict:
            raise CniError(
                cni.E_INVALID_ENV,
                f"invalid environment variable CNI_ARGS: {POD_UID}={uid!r} is not a pod UID",
                "expected a UID such as 3f1c0a52-5b1e-4c55-9d8e-0c2b3a4d5e6f",
            )
        log.warning("%s=%r in CNI_ARGS is not a pod UID; ignored", POD_UID, uid)
        return None
    return uid


def chained(c: Conf) -> bool:
    """Called after another plugin of a conflist (ADD carries its prevResult)."""
    return c.prev_result is not None


def held_by(c: Conf, uid: str) -> List[Held]:
    """The pod's claimed NICs, in `claims.for_pod` order."""
    try:
        record = claims.load(c.policy.dra_state_dir)
    except claims.ClaimRecordError as e:
        raise CniError(
            cni.E_CLAIM_RECORD,
            "the DRA claim record is unusable",
            f"{e} (written by virtdp-serve; draStateDir in {c.policy.source})",
        ) from None
    return claims.for_pod(record, uid)


def _describe(cl: claims.PreparedClaim, d: claims.ClaimedDevice) -> str:
    return f"claim {cl.namespace}/{cl.name} (request {d.request}, device {d.device})"


# -- ADD ----------------------------------------------------------------------------------------


def passthrough(c: Conf) -> Dict[str, Any]:
    """The answer of a chained call with nothing to do: the prevResult, as is."""
    assert c.prev_result is not None
    out = dict(c.prev_result)
    out.setdefault("cniVersion", c.cni_version)
    return out


def cmd_add(env: Env, c: Conf, environ: Mapping[str, str]) -> Dict[str, Any]:
    uid = pod_uid(env)
    if uid is None:
        if chained(c):
            log.debug("ADD %s: no %s in CNI_ARGS; passing through", env.container_id, POD_UID)
            return passthrough(c)
        raise CniError(
            cni.E_INVALID_CONFIG,
            "invalid network configuration: no NIC given",
            "set deviceID (or pciBusID, or runtimeConfig.deviceID) to a PCI address, or device "
            "to a host interface name, or hwaddr to its MAC; or let the pod's DRA claim name "
            f"it, which needs {POD_UID} in CNI_ARGS (containerd and CRI-O pass it)",
        )
    held = held_by(c, uid)
    if not held:
        if chained(c):
            log.debug("ADD %s: pod %s holds no claimed NIC; passing through", env.container_id, uid)
            return passthrough(c)
        raise CniError(
            cni.E_NO_CLAIM,
            f"pod {uid} holds no NIC claimed from virtdp on this node",
            f"{claims.claims_path(c.policy.dra_state_dir)} lists no prepared claim reserved for "
            "it, and the network config names no device (a NAD without a resourceName takes "
            "the pod's claimed NIC)",
        )
    if netns.is_own(env.netns):
        raise plugin._own_netns(env)
    if chained(c) and c.mac and len(held) > 1:
        raise CniError(
            cni.E_INVALID_CONFIG,
            "invalid network configuration: mac",
            f"a MAC is for one NIC, and pod {uid} gets {len(held)} by its claims",
        )
    with contextlib.ExitStack() as hold:
        host = hold.enter_context(netns.open_ns(None))
        pod = plugin._open_pod(hold, env)
        picks = _names(env, c, pod, held) if chained(c) else [_pick(env, pod, uid, held)]
        # Every lock first, in PCI order: two calls wanting overlapping NICs cannot deadlock.
        for pci_address in sorted({d.pci_address for _, d, _ in picks}):
            hold.enter_context(
                locks.device_lock(
                    c.sysfs_root, pci_address, c.lock_timeout, while_waiting=caller.checkpoint
                )
            )
        nics = []
        for cl, d, name in picks:
            try:
                fn, nic = plugin._host_nic(c, host, d.pci_address)
                plugin._check_allowed(c, d.pci_address, fn, nic)
            except CniError as e:
                raise CniError(e.code, f"{_describe(cl, d)}: {e.msg}", e.details) from None
            plugin._ifname_free(env, pod, name)
            nics.append(nic)
        done = []
        with contextlib.ExitStack() as undo:
            for i, ((cl, d, name), nic) in enumerate(zip(picks, nics)):
                # One IPAM config for every NIC: the same routes each time; they go in once,
                # through the first NIC.
                link, got = plugin._plumb(
                    env,
                    c,
                    environ,
                    host,
                    pod,
                    d.pci_address,
                    nic,
                    name,
                    undo,
                    owner=(uid, cl.uid, env.ifname),
                    routes=i == 0,
                )
                done.append((cl, d, link, got))
            for cl, d, link, got in done:
                _write_status(env, c, uid, cl, d, link, got, undo)
            caller.checkpoint("the result was ready")
            undo.pop_all()
    if not chained(c):
        _, d, link, got = done[0]
        return plugin._add_result(env, c, d.pci_address, link, got)
    return _chained_result(env, c, done)


def _pick(env: Env, pod: Any, uid: str, held: List[Held]) -> Tuple[Any, Any, str]:
    """The one claimed NIC a NAD attachment takes (see the module docstring)."""
    for cl, d in held:
        if d.interface_name == env.ifname:
            return cl, d, env.ifname
    in_pod = set()
    for link in netns.links(pod):
        mark = alias.decode(link.alias)
        if mark is not None:
            in_pod.add(mark.pci_address)
    for cl, d in held:
        if d.interface_name is None and d.pci_address not in in_pod:
            return cl, d, env.ifname
    listed = "; ".join(
        f"{_describe(cl, d)}"
        + (f" named {d.interface_name} by its claim" if d.interface_name else "")
        + (" already in the pod" if d.pci_address in in_pod else "")
        for cl, d in held
    )
    raise CniError(
        cni.E_NO_CLAIM,
        f"no claimed NIC of pod {uid} is left for attachment {env.ifname}",
        f"the pod's claimed NICs: {listed}. A NIC its claim names goes to the attachment of "
        "that name (the interface in the pod's network selection)",
    )


def _names(env: Env, c: Conf, pod: Any, held: List[Held]) -> List[Tuple[Any, Any, str]]:
    """Every claimed NIC of the pod with its name in the pod: the claim's, else net1, net2, ...
    skipping names the pod has, the prevResult lists, or a claim gives another NIC."""
    named: Dict[str, claims.ClaimedDevice] = {}
    for _, d in held:
        if d.interface_name is None:
            continue
        if d.interface_name in named:
            raise CniError(
                cni.E_CLAIM_RECORD,
                f"two claimed NICs of the pod are both to be named {d.interface_name}",
                f"devices {named[d.interface_name].device} and {d.device} in "
                f"{claims.claims_path(c.policy.dra_state_dir)}; their claims' opaque config "
                "must give each a name of its own",
            )
        named[d.interface_name] = d
    taken: Set[str] = {link.name for link in netns.links(pod)} | set(named)
    for it in (c.prev_result or {}).get("interfaces") or []:
        if isinstance(it, dict) and isinstance(it.get("name"), str):
            taken.add(it["name"])
    out = []
    n = 1
    for cl, d in held:
        name = d.interface_name
        if name is None:
            while f"net{n}" in taken:
                n += 1
            name = f"net{n}"
            taken.add(name)
        out.append((cl, d, name))
    return out


def _write_status(
    env: Env,
    c: Conf,
    uid: str,
    cl: claims.PreparedClaim,
    d: claims.ClaimedDevice,
    link: netns.Link,
    got: res.Result,
    undo: contextlib.ExitStack,
) -> None:
    """The NIC's network status for virtdp-serve to put into the claim; its undo first."""
    directory = c.policy.dra_state_dir
    undo.callback(_remove_status, directory, cl.uid, d.device)
    status = claims.DeviceStatus(
        claim_uid=cl.uid,
        claim_namespace=cl.namespace,
        claim_name=cl.name,
        driver=cl.driver,
        pool=d.pool,
        device=d.device,
        pod_uid=uid,
        container_id=env.container_id,
        if_name=env.ifname,
        interface_name=link.name,
        ips=tuple(ip.address for ip in got.ips),
        hardware_address=link.mac,
    )
    try:
        claims.write_status(directory, status)
    except (OSError, ValueError) as e:
        raise CniError(
            cni.E_IO,
            f"cannot record the network status of {d.device} ({_describe(cl, d)})",
            f"{claims.status_dir(directory)}: {e}",
        ) from None


def _remove_status(directory: str, claim_uid: str, device: str) -> None:
    try:
        claims.remove_status(directory, claim_uid, device)
    except (OSError, ValueError) as e:
        log.error("could not remove the network status of %s/%s: %s", claim_uid, device, e)


def _chained_result(env: Env, c: Conf, done: List[Tuple[Any, Any, Any, Any]]) -> Dict[str, Any]:
    """The prevResult, as is, plus the new interfaces, their IPs and routes."""
    out = dict(c.prev_result or {})
    base = len(out.get("interfaces") or [])
    interfaces: List[res.Interface] = []
    ips: List[res.IP] = []
    routes: List[res.RouteSpec] = []
    dns: Dict[str, Any] = {}
    for i, (_, d, link, got) in enumerate(done):
        interfaces.append(
            res.Interface(
                name=link.name,
                mac=link.mac,
                mtu=link.mtu,
                sandbox=env.netns,
                pci_id=d.pci_address,
            )
        )
        ips.extend(res.IP(ip.address, ip.gateway, base + i) for ip in got.ips)
        routes.extend(got.routes)
        dns = dns or got.dns
    new = res.render(res.Result(tuple(interfaces), tuple(ips), tuple(routes), dns), c.cni_version)
    out["cniVersion"] = c.cni_version
    for key in ("interfaces", "ips", "routes"):
        if new.get(key):
            out[key] = list(out.get(key) or []) + new[key]
    if not out.get("dns"):  # the cluster network's DNS is the pod's; ours only if it has none
        out["dns"] = c.dns or new["dns"]
    return out


# -- DEL ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Gone:
    """One NIC of the attachment to give back (when `link` is set) and account for."""

    pci_address: str
    claim_uid: Optional[str] = None
    device: Optional[str] = None
    src: Any = None  # the namespace it is in: the pod's, or the host's
    src_path: str = ""
    link: Optional[netns.Link] = None
    mark: Optional[alias.Mark] = None
    name: Optional[str] = None  # its name in the pod: the IPAM DEL's CNI_IFNAME


def statuses_of(env: Env, c: Conf) -> List[claims.DeviceStatus]:
    """The network status files of this attachment (CNI_CONTAINERID and CNI_IFNAME)."""
    bad: List[claims.ClaimRecordError] = []
    try:
        every = claims.load_statuses(c.policy.dra_state_dir, errors=bad)
    except OSError as e:  # never a reason for DEL to fail: the marks still find the NICs
        log.warning("%s %s: network status files unreadable: %s", env.command, env.container_id, e)
        return []
    out = [s for s in every if s.container_id == env.container_id and s.if_name == env.ifname]
    for why in bad:
        log.warning(
            "%s %s: unreadable network status skipped: %s", env.command, env.container_id, why
        )
    return out


def cmd_del(env: Env, c: Conf, environ: Mapping[str, str]) -> None:
    """Best effort, idempotent, NIC by NIC: give it back, IPAM DEL, remove its status.

    Also run for a config that names a device when status files name this attachment (the
    config changed since a by-claim ADD): `plugin`'s DEL first, then the claimed NICs."""
    errors: List[CniError] = []
    if c.names_nic:
        try:
            plugin.cmd_del(env, c, environ)
        except CniError as e:
            errors.append(e)
    uid = pod_uid(env, strict=False)
    statuses = statuses_of(env, c)
    if not statuses and uid is not None and _holds_none(c, uid):
        # Neither a claim nor a status: an ADD that passed through, nothing of ours is there.
        log.debug("DEL %s: pod %s holds no claimed NIC; nothing to do", env.container_id, uid)
    else:
        errors += _release(env, c, environ, uid, statuses)
    if errors:
        first = errors[0]
        if len(errors) > 1:
            first.details = "; ".join(f"{e.msg}: {e.details}" for e in errors)
        raise first


def _release(
    env: Env,
    c: Conf,
    environ: Mapping[str, str],
    uid: Optional[str],
    statuses: List[claims.DeviceStatus],
) -> List[CniError]:
    errors: List[CniError] = []
    with contextlib.ExitStack() as hold:
        host = hold.enter_context(netns.open_ns(None))
        gone = _find(hold, env, c, uid, host)
        for s in statuses:
            key = (s.claim_uid, s.device)
            entry = next((g for g in gone if (g.claim_uid, g.device) == key), None)
            if entry is None:
                pci_address = claims.pci_address_of(s.device)
                if pci_address is None:
                    continue
                entry = _Gone(pci_address, s.claim_uid, s.device)
                gone.append(entry)
            entry.name = entry.name or s.interface_name
        for g in sorted(gone, key=lambda g: g.pci_address):
            try:
                _give_back_one(env, c, environ, host, g)
            except CniError as e:
                errors.append(e)
            except netns.NetnsError as e:
                errors.append(CniError(cni.E_NETLINK, "cannot give the NIC back", str(e)))
    return errors


def _holds_none(c: Conf, uid: str) -> bool:
    try:
        return not held_by(c, uid)
    except CniError:
        return False  # unreadable: look


def _find(
    hold: contextlib.ExitStack, env: Env, c: Conf, uid: Optional[str], host: Any
) -> List[_Gone]:
    """This attachment's NICs taken by claim: marked for it in the pod, or back on the host
    marked for this pod and attachment (the pod's namespace died); and, for a config naming no
    device, a NIC at CNI_IFNAME in the pod that a config naming one plumbed (the config changed
    since ADD; with a config naming a device, `plugin`'s DEL has given that one back)."""
    out: List[_Gone] = []
    if env.netns and netns.is_own(env.netns):
        log.warning("DEL %s: CNI_NETNS is our own namespace; looking on the host", env.container_id)
    elif env.netns:
        try:
            pod = hold.enter_context(netns.open_ns(env.netns))
        except netns.NamespaceNotFound:
            log.info("DEL %s: %s is gone; looking on the host", env.container_id, env.netns)
        else:
            for link in netns.links(pod):
                mark = alias.decode(link.alias)
                if mark is None:
                    continue
                if mark.claim and mark.attachment == env.ifname:
                    out.append(_gone(mark, pod, env.netns, link, link.name))
                elif mark.claim is None and link.name == env.ifname and not c.names_nic:
                    out.append(_gone(mark, pod, env.netns, link, link.name))
    if uid is not None:
        for link in netns.links(host):
            mark = alias.decode(link.alias)
            if mark and mark.pod == uid and mark.attachment == env.ifname:
                out.append(_gone(mark, host, plugin.HOST_NS, link, None))
    return out


def _gone(
    mark: alias.Mark, src: Any, src_path: str, link: netns.Link, name: Optional[str]
) -> _Gone:
    device = claims.device_name(mark.pci_address) if mark.claim else None
    return _Gone(mark.pci_address, mark.claim, device, src, src_path, link, mark, name)


def _give_back_one(env: Env, c: Conf, environ: Mapping[str, str], host: Any, g: _Gone) -> None:
    if g.link is not None and g.mark is not None:
        with contextlib.ExitStack() as hold:
            hold.enter_context(locks.device_lock(c.sysfs_root, g.pci_address, c.lock_timeout))
            # Looked up again under the lock: another DEL may have just given it back.
            link = netns.link_by_name(g.src, g.link.name)
            if link is not None and alias.decode(link.alias) == g.mark:
                plugin._give_back(hold, host, g.src, g.src_path, link, g.mark)
                log.info(
                    "DEL %s: %s is back on the host as %s",
                    env.container_id,
                    g.pci_address,
                    g.mark.host_ifname,
                )
    if c.ipam_type and g.name:
        try:
            ipam.find(c.ipam_type, list(env.path))
        except CniError as e:
            # The plugin is gone from CNI_PATH: a resource already missing (spec 1.1, DEL).
            log.warning("DEL %s: %s: %s; IPAM DEL skipped", env.container_id, e.msg, e.details)
        else:
            ipam_env = {**environ, "CNI_IFNAME": g.name}
            ipam.run(c.ipam_type, "DEL", ipam_env, c.raw, list(env.path))
    if g.claim_uid and g.device:
        claims.remove_status(c.policy.dra_state_dir, g.claim_uid, g.device)


# -- CHECK --------------------------------------------------------------------------------------


def cmd_check(env: Env, c: Conf, environ: Mapping[str, str]) -> None:
    """Through a NAD the attachment is one NIC at CNI_IFNAME: `plugin`'s CHECK. Chained: each
    NIC marked for this attachment as the prevResult lists it, and every NIC the pod's claims
    hold among them."""
    prev = plugin._check_prev(c)
    if netns.is_own(env.netns):
        raise plugin._own_netns(env)
    try:
        with netns.open_ns(env.netns) as pod:
            link = netns.link_by_name(pod, env.ifname)
            if link is not None and alias.decode(link.alias) is not None:
                nad = True
            else:
                nad = False
                names = _check_chained(env, c, pod, prev)
    except netns.NamespaceNotFound as e:
        raise CniError(cni.E_NETNS_MISSING, "CNI_NETNS does not exist", str(e)) from None
    if nad:
        plugin.cmd_check(env, c, environ)
        return
    if c.ipam_type:
        for name in names:
            ipam_env = {**environ, "CNI_IFNAME": name}
            ipam.run(c.ipam_type, "CHECK", ipam_env, c.raw, list(env.path))


def _check_chained(env: Env, c: Conf, pod: Any, prev: res.Result) -> List[str]:
    mine = {}
    for link in netns.links(pod):
        mark = alias.decode(link.alias)
        if mark is not None and mark.claim and mark.attachment == env.ifname:
            mine[mark.pci_address] = link.name
    for name in mine.values():
        plugin._check_pod(dataclasses.replace(env, ifname=name), c, pod, prev)
    uid = pod_uid(env)
    if uid is not None:
        for cl, d in held_by(c, uid):
            if d.pci_address not in mine:
                raise plugin._check_failed(
                    f"{_describe(cl, d)}: NIC {d.pci_address} is not in {env.netns}"
                )
    return sorted(mine.values())


# -- GC -----------------------------------------------------------------------------------------


def cmd_gc(env: Env, c: Conf, environ: Mapping[str, str]) -> None:
    """`plugin`'s GC (IPAM), then the network status files of attachments not in
    cni.dev/valid-attachments whose NIC is home again (on the host, without our mark)."""
    plugin.cmd_gc(env, c, environ)
    valid = {
        (a.get("containerID"), a.get("ifname")) for a in c.raw.get("cni.dev/valid-attachments", [])
    }
    bad: List[claims.ClaimRecordError] = []
    try:
        every = claims.load_statuses(c.policy.dra_state_dir, errors=bad)
    except OSError as e:
        raise CniError(cni.E_IO, "cannot read the network status files", str(e)) from None
    for why in bad:
        log.warning("GC: unreadable network status left alone: %s", why)
    stale = [s for s in every if (s.container_id, s.if_name) not in valid]
    if not stale:
        return
    with netns.open_ns(None) as host:
        home = {}
        for link in netns.links(host):
            if alias.decode(link.alias) is None:
                home[link.name] = link
        for s in stale:
            pci_address = claims.pci_address_of(s.device)
            if pci_address is None or not _is_home(c, pci_address, home):
                continue
            log.info(
                "GC: %s of claim %s/%s is home; its network status goes",
                s.device,
                s.claim_namespace,
                s.claim_name,
            )
            _remove_status(c.policy.dra_state_dir, s.claim_uid, s.device)


def _is_home(c: Conf, pci_address: str, home: Mapping[str, netns.Link]) -> bool:
    from virtcore import sysfs

    try:
        fn = sysfs.read_function(c.sysfs_root, pci_address)
    except sysfs.DeviceNotFound:
        return False
    return any(name in home for name in fn.netdevs)


COMMANDS: Dict[str, Callable[[Env, Conf, Mapping[str, str]], Optional[Dict[str, Any]]]] = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
    "STATUS": plugin.cmd_status,
    "GC": cmd_gc,
}
