"""ehost-device: hand a virtio NIC to a pod, and give it back (CNI 1.1 ADD, DEL, CHECK, STATUS, GC).

Reads top to bottom: finding the NIC, `cmd_add`, `cmd_del`, `cmd_check`, `cmd_status`,
`cmd_gc`, and `run`, the dispatch. What a NIC looked like on the host (name, MTU, MAC, down)
travels on the NIC itself as its link alias (`virtcore.alias.Mark`), so DEL never depends on a
file. Every ADD step registers its undo before the next one runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ehost_device import caller, ipam, locks
from ehost_device import conf as cni
from ehost_device import result as res
from ehost_device.conf import CniError, Conf, Env
from virtcore import alias, netns, sysfs

log = logging.getLogger("ehost-device")

HOST_NS = "/proc/self/ns/net"  # the runtime runs us in the host's network namespace


# -- finding the NIC ----------------------------------------------------------------------------


def _resolve_pci(c: Conf, host: Any) -> str:
    """The PCI address of the NIC the config names (deviceID, else device, else hwaddr)."""
    if c.pci_address:
        return c.pci_address
    name = c.device
    if name is None:
        matches = [link for link in netns.links(host) if link.mac == c.hwaddr]
        if not matches:
            raise CniError(
                cni.E_NIC_NOT_FOUND,
                f"no host interface has MAC {c.hwaddr}",
                "hwaddr must name a NIC in the host network namespace",
            )
        name = matches[0].name
    addr = sysfs.netdev_pci_address(c.sysfs_root, name)
    if addr is None:
        if netns.link_by_name(host, name) is None:
            raise CniError(
                cni.E_NIC_NOT_FOUND,
                f"no host interface {name}",
                f"device must name a NIC in the host network namespace ({c.sysfs_root}/class/net)",
            )
        raise CniError(
            cni.E_NOT_VIRTIO,
            f"host interface {name} is not a PCI NIC",
            f"{c.sysfs_root}/class/net/{name} leads to no PCI function",
        )
    return addr


def _host_nic(c: Conf, host: Any, pci_address: str) -> Tuple[sysfs.VirtioNic, netns.Link]:
    """The NIC's PCI function and its link in the host namespace; errors say why it cannot be
    had."""
    try:
        fn = sysfs.read_function(c.sysfs_root, pci_address)
    except sysfs.DeviceNotFound:
        raise CniError(
            cni.E_NIC_NOT_FOUND,
            f"no PCI device {pci_address}",
            f"nothing at {c.sysfs_root}/bus/pci/devices/{pci_address}",
        ) from None
    if fn.vendor != sysfs.VIRTIO_VENDOR or fn.device not in sysfs.VIRTIO_NET_PCI_DEVICES:
        raise CniError(
            cni.E_NOT_VIRTIO,
            f"PCI device {pci_address} is not a virtio NIC",
            f"vendor {fn.vendor}, device {fn.device}; expected vendor {sysfs.VIRTIO_VENDOR}, "
            f"device {' or '.join(sysfs.VIRTIO_NET_PCI_DEVICES)}",
        )
    if fn.virtio_name is None or fn.driver != "virtio_net":
        raise CniError(
            cni.E_NOT_VIRTIO,
            f"virtio device {pci_address} is not bound to virtio_net",
            "; ".join(fn.problems) or f"driver is {fn.driver}",
        )
    for name in fn.netdevs:
        link = netns.link_by_name(host, name)
        if link is not None:
            return fn, link
    raise CniError(
        cni.E_NIC_BUSY,
        f"NIC {pci_address} is not in the host network namespace",
        "it is inside another network namespace (plumbed into another pod?)",
    )


def _check_allowed(c: Conf, pci_address: str, fn: sysfs.VirtioNic, nic: netns.Link) -> None:
    """The node policy's guard, on the host side before anything changes: the NIC must be one
    that discovery calls eligible (virtcore.discovery.exclusion: never a NIC the node itself uses,
    with a default route in any table or an address its routes use), the same rule by which
    virtdp-serve advertises NICs, and, when the policy names pools, in one of them. The config's
    deviceID may have been written by a tenant: the device plugin keeps such NICs out of pools,
    this keeps them out of pods."""
    from virtcore import discovery, netlink

    pool_policy = None
    if c.policy.allowed_pools:
        from ehost_device import policy
        from virtcore import pools

        try:
            config = policy.pool_config(c.policy)
        except pools.ConfigError as e:
            raise CniError(
                cni.E_POLICY, "the node policy's pool config is unusable", str(e)
            ) from None
        pool_policy = discovery.PoolPolicy(config, c.policy.allowed_pools, c.policy.source)
    try:
        # The caller's namespace is the host's (open_ns(None)): read by the stdlib decoder,
        # the NIC's link only, with every route and address.
        snap = netlink.snapshot(names=[nic.name])
    except netlink.NetlinkReadError as e:
        raise CniError(cni.E_NETLINK, "cannot read the host's links and routes", str(e)) from None
    entry = discovery.describe(fn, snap, policy=pool_policy)
    if not entry.eligible:
        raise CniError(
            cni.E_NOT_ALLOWED,
            f"NIC {pci_address} ({nic.name}) may not go to a pod: {entry.excluded_reason}",
            "ehost-device moves only a NIC that virtdp's discovery calls eligible (never the "
            "node's own) and the node policy allows; name a NIC from the device plugin's pool",
        )


def _matches(c: Conf, mark: alias.Mark, link: netns.Link) -> bool:
    """Whether a NIC carrying `mark` is the one this config names."""
    if c.pci_address:
        return mark.pci_address == c.pci_address
    if c.device:
        return mark.host_ifname == c.device
    if c.hwaddr:
        return c.hwaddr in (link.mac, mark.mac)
    return True


def _undo_step(undo: contextlib.ExitStack, what: str, fn: Callable[[], Any]) -> None:
    def run() -> None:
        try:
            fn()
        except Exception as e:  # best effort: the other undo steps must still run
            log.error("could not undo %s: %s", what, e)

    undo.callback(run)


# -- ADD ----------------------------------------------------------------------------------------


def cmd_add(env: Env, c: Conf, environ: Mapping[str, str]) -> Dict[str, Any]:
    if netns.is_own(env.netns):  # the NIC would only be renamed on the host
        raise _own_netns(env)
    with contextlib.ExitStack() as hold:
        host = hold.enter_context(netns.open_ns(None))
        pci_address = _resolve_pci(c, host)
        hold.enter_context(
            locks.device_lock(
                c.sysfs_root, pci_address, c.lock_timeout, while_waiting=caller.checkpoint
            )
        )
        fn, nic = _host_nic(c, host, pci_address)
        _check_allowed(c, pci_address, fn, nic)
        pod = _open_pod(hold, env)
        _ifname_free(env, pod, env.ifname)
        with contextlib.ExitStack() as undo:
            link, got = _plumb(env, c, environ, host, pod, pci_address, nic, env.ifname, undo)
            caller.checkpoint("the result was ready")
            undo.pop_all()

    return _add_result(env, c, pci_address, link, got)


def _open_pod(hold: contextlib.ExitStack, env: Env) -> Any:
    try:
        return hold.enter_context(netns.open_ns(env.netns))
    except netns.NamespaceNotFound as e:
        raise CniError(cni.E_NETNS_MISSING, "CNI_NETNS does not exist", str(e)) from None


def _ifname_free(env: Env, pod: Any, ifname: str) -> None:
    if netns.link_by_name(pod, ifname) is not None:
        raise CniError(
            cni.E_IFNAME_EXISTS,
            f"interface {ifname} already exists in {env.netns}",
            (
                "CNI_IFNAME must not exist in the pod namespace"
                if ifname == env.ifname
                else "the name the pod's claim gives the NIC must be free in the pod namespace"
            ),
        )


def _plumb(
    env: Env,
    c: Conf,
    environ: Mapping[str, str],
    host: Any,
    pod: Any,
    pci_address: str,
    nic: netns.Link,
    ifname: str,
    undo: contextlib.ExitStack,
    *,
    owner: Optional[Tuple[str, str, str]] = None,
    routes: bool = True,
) -> Tuple[netns.Link, res.Result]:
    """Move the host NIC `nic` into the pod as `ifname`, bring it up, and run the IPAM ADD for
    it (CNI_IFNAME `ifname`); every step registers its undo on `undo` before the next runs.
    `owner`: (pod UID, claim UID, attachment), recorded in the mark of a NIC taken by claim.
    `routes`: install the IPAM result's routes (False: its addresses only, and the result
    returned has no routes)."""
    # A NIC that still carries our mark came back from a namespace that died before its
    # DEL: the mark, not its current state, says what it looked like on the host.
    old = alias.decode(nic.alias)
    if old is not None and old.pci_address != pci_address:
        old = None
    orig_mtu = old.mtu if old and old.mtu is not None else nic.mtu
    orig_mac = old.mac if old and old.mac else nic.mac
    final_mtu = c.mtu or nic.mtu
    final_mac = c.mac or nic.mac
    mark = alias.Mark(
        host_ifname=old.host_ifname if old else nic.name,
        pci_address=pci_address,
        mtu=orig_mtu if orig_mtu != final_mtu else None,
        mac=orig_mac if orig_mac != final_mac else None,
        was_down=old.was_down if old else not nic.up,
    )
    if owner is not None:
        pod_uid, claim_uid, attachment = owner
        mark = dataclasses.replace(mark, pod=pod_uid, claim=claim_uid, attachment=attachment)
    encoded = mark.encode()
    if len(encoded.encode()) > alias.MAX_BYTES:
        raise CniError(
            cni.E_INVALID_ENV,
            f"the mark for {pci_address} does not fit a link alias",
            f"{encoded!r} is over {alias.MAX_BYTES} bytes (a pod or claim UID too long?)",
        )
    log.info(
        "ADD %s: %s (%s) -> %s in %s",
        env.container_id,
        nic.name,
        pci_address,
        ifname,
        env.netns,
    )

    caller.checkpoint("the NIC moved")
    # The mark first: should this process (or the executor) die right after the next step, the
    # NIC is down, and only the mark tells a DEL that it was up.
    netns.set_alias(host, nic, encoded, undo=undo)
    if nic.up:  # links are renamed, and MACs changed, while down
        netns.set_up(host, nic, False, undo=undo)
    # Moved and renamed in one request, so the rename happens as the NIC arrives in the pod:
    # no udev or NetworkManager on the host races it, and the host name cannot clash with a
    # pod link of the same name. One move, not two through a namespace of our own: a move
    # costs the kernel two RCU grace periods.
    link = netns.move(host, nic, pod, env.netns, HOST_NS, name=ifname, undo=undo)
    if c.mtu:  # still down: the MAC and MTU change before anything uses the link
        link = netns.set_mtu(pod, link, c.mtu, undo=undo)
    if c.mac:
        link = netns.set_mac(pod, link, c.mac, undo=undo)
    netns.set_up(pod, link, True, undo=undo)

    got = res.Result()
    if c.ipam_type:
        ipam_type = c.ipam_type
        ipam_env = environ if ifname == env.ifname else {**environ, "CNI_IFNAME": ifname}
        caller.checkpoint("IPAM ADD")
        # Registered before the call: an IPAM ADD that fails half-way is DELeted too.
        _undo_step(
            undo,
            "IPAM ADD",
            lambda: ipam.run(ipam_type, "DEL", ipam_env, c.raw, list(env.path)),
        )
        raw = ipam.run(ipam_type, "ADD", ipam_env, c.raw, list(env.path))
        try:
            got = res.parse(raw or {})
        except res.ResultError as e:
            raise CniError(
                cni.E_IPAM_RESULT,
                f"IPAM plugin {ipam_type} returned an unusable result",
                str(e),
            ) from None
        if not routes:
            got = dataclasses.replace(got, routes=())
        _configure(pod, link, got, undo)
    return link, got


def _configure(pod: Any, link: netns.Link, got: res.Result, undo: contextlib.ExitStack) -> None:
    """Addresses and routes from the IPAM result, inside the pod namespace."""
    gateways: Dict[int, str] = {}
    for ip in got.ips:
        netns.add_address(pod, link, ip.address, undo=undo)
        if ip.gateway and ip.family not in gateways:
            gateways[ip.family] = ip.gateway
    for r in got.routes:
        family = 6 if ":" in r.dst else 4
        netns.add_route(
            pod,
            link,
            netns.Route(
                dst=r.dst,
                gw=r.gw or gateways.get(family),
                priority=r.priority,
                table=r.table,
                scope=r.scope,
                mtu=r.mtu,
                advmss=r.advmss,
            ),
            undo=undo,
        )


def _add_result(
    env: Env, c: Conf, pci_address: str, link: netns.Link, got: res.Result
) -> Dict[str, Any]:
    prev = res.Result()
    if c.prev_result:
        try:
            prev = res.parse(c.prev_result)
        except res.ResultError:
            prev = res.Result()
    index = len(prev.interfaces)
    iface = res.Interface(
        name=env.ifname, mac=link.mac, mtu=link.mtu, sandbox=env.netns, pci_id=pci_address
    )
    ips = tuple(res.IP(ip.address, ip.gateway, index) for ip in got.ips)
    # DNS: the config's own `dns` (as host-device and bridge report it), else the IPAM's.
    out = res.Result(
        interfaces=prev.interfaces + (iface,),
        ips=prev.ips + ips,
        routes=prev.routes + got.routes,
        dns=c.dns or got.dns or prev.dns,
    )
    return res.render(out, c.cni_version)


# -- DEL ----------------------------------------------------------------------------------------


def _start_ipam(
    command: str, env: Env, c: Conf, environ: Mapping[str, str]
) -> Tuple[Optional[ipam.Delegation], Optional[CniError]]:
    """Start the IPAM plugin's `command` to run alongside ours: (the call, or why it could not
    start). No IPAM configured: (None, None)."""
    if not c.ipam_type:
        return None, None
    try:
        return ipam.start(c.ipam_type, command, environ, c.raw, list(env.path)), None
    except CniError as e:
        return None, e


def cmd_del(env: Env, c: Conf, environ: Mapping[str, str]) -> None:
    """Best effort, idempotent: give the NIC back if it is anywhere we can see, and IPAM DEL.

    The two do not depend on each other: IPAM DEL starts first and runs alongside. Errors are
    reported NIC first, IPAM second. An IPAM plugin that cannot be run at all (its binary gone
    from CNI_PATH) is a resource already missing (spec 1.1, DEL): a warning, not an error, so
    the runtime can finish tearing the pod down; any lease it holds stays with it.
    """
    pending, ipam_error = _start_ipam("DEL", env, c, environ)
    ipam_missing = pending is None and ipam_error is not None
    try:
        errors = _del_nic(env, c)
    finally:
        if pending is not None:
            try:
                pending.result()
            except CniError as e:
                ipam_error = e
    if ipam_missing and ipam_error is not None:
        log.warning(
            "DEL %s: %s: %s; the NIC part is done, IPAM DEL is skipped (a lease it holds "
            "stays until the plugin is back and a DEL or GC reaches it)",
            env.container_id,
            ipam_error.msg,
            ipam_error.details,
        )
    elif ipam_error is not None:
        errors.append(ipam_error)
    if errors:
        first = errors[0]
        if len(errors) > 1:
            first.details = "; ".join(f"{e.msg}: {e.details}" for e in errors)
        raise first


def _del_nic(env: Env, c: Conf) -> List[CniError]:
    """Give back this attachment's NIC.

    The link named CNI_IFNAME in CNI_NETNS that carries our mark is this attachment's NIC,
    whatever the config names now: a runtime sends the config as it is at DEL time (containerd
    reads its conflist again), and the mark names the NIC. The config's deviceID, device or
    hwaddr only steer the search on the host (the pod namespace died, or an ADD was cut short),
    where they keep a DEL from taking another attachment's NIC. One NIC lock is held at a time,
    the lock of the NIC being given back.
    """
    errors: List[CniError] = []
    with contextlib.ExitStack() as hold:
        host = hold.enter_context(netns.open_ns(None))
        found = None
        if env.netns and netns.is_own(env.netns):
            log.warning(
                "DEL %s: CNI_NETNS is our own namespace; looking on the host", env.container_id
            )
        elif env.netns:
            found = _in_pod(hold, env, c)
        if found is None:
            # The namespace died (the kernel returned the NIC to the host, maybe as devN), or
            # an ADD was cut short: the mark on the link finds it.
            if c.pci_address:
                hold.enter_context(locks.device_lock(c.sysfs_root, c.pci_address, c.lock_timeout))
            for link in netns.links(host):
                mark = alias.decode(link.alias)
                if mark and _matches(c, mark, link):
                    if not c.pci_address:
                        hold.enter_context(
                            locks.device_lock(c.sysfs_root, mark.pci_address, c.lock_timeout)
                        )
                    found = (host, HOST_NS, link, mark)
                    break
        if found is not None:
            src, src_path, link, mark = found
            try:
                _give_back(hold, host, src, src_path, link, mark)
                log.info(
                    "DEL %s: %s is back on the host as %s",
                    env.container_id,
                    mark.pci_address,
                    mark.host_ifname,
                )
            except netns.NetnsError as e:
                errors.append(CniError(cni.E_NETLINK, "cannot give the NIC back", str(e)))
            except CniError as e:
                errors.append(e)
        else:
            log.info("DEL %s: no NIC to give back", env.container_id)
    return errors


def _in_pod(
    hold: contextlib.ExitStack, env: Env, c: Conf
) -> Optional[Tuple[Any, str, netns.Link, alias.Mark]]:
    """The marked NIC at CNI_IFNAME in CNI_NETNS (or renamed back by a DEL cut short), its lock
    held; None if there is none."""
    try:
        pod = hold.enter_context(netns.open_ns(env.netns))
    except netns.NamespaceNotFound:
        log.info("DEL %s: %s is gone; looking on the host", env.container_id, env.netns)
        return None
    link = netns.link_by_name(pod, env.ifname) or _renamed_in_pod(env, c, pod)
    mark = alias.decode(link.alias) if link else None
    if link is None:
        return None
    if mark is None:
        log.warning(
            "DEL %s: %s in %s carries no virtdp mark; left alone",
            env.container_id,
            env.ifname,
            env.netns,
        )
        return None
    if not _matches(c, mark, link):
        log.warning(
            "DEL %s: %s in %s is %s, not the NIC the config names now; giving it back (the "
            "config changed since ADD)",
            env.container_id,
            env.ifname,
            env.netns,
            mark.pci_address,
        )
    with contextlib.ExitStack() as lock:
        lock.enter_context(locks.device_lock(c.sysfs_root, mark.pci_address, c.lock_timeout))
        # Looked up again under the lock: a DEL of the same attachment may have just finished.
        link = netns.link_by_name(pod, link.name)
        if link is None or alias.decode(link.alias) != mark:
            log.info("DEL %s: %s left %s meanwhile", env.container_id, env.ifname, env.netns)
            return None
        hold.enter_context(lock.pop_all())
    return (pod, env.netns, link, mark)


def _renamed_in_pod(env: Env, c: Conf, pod: Any) -> Optional[netns.Link]:
    """The NIC a DEL that was cut short (its process or the executor killed) left in the pod:
    renamed back to its host name, maybe reset, not moved home yet. Only when the config names
    the NIC, so that the mark says it is this attachment's."""
    if not (c.pci_address or c.device or c.hwaddr):
        return None
    for link in netns.links(pod):
        mark = alias.decode(link.alias)
        if mark is not None and link.name == mark.host_ifname and _matches(c, mark, link):
            log.info(
                "DEL %s: %s is in %s as %s (a DEL cut short); giving it back",
                env.container_id,
                mark.pci_address,
                env.netns,
                link.name,
            )
            return link
    return None


def _give_back(
    hold: contextlib.ExitStack,
    host: Any,
    src: Any,
    src_path: str,
    link: netns.Link,
    mark: alias.Mark,
) -> None:
    """Move a marked NIC from `src` to the host under its host name and settings; on failure
    it stays where it was.

    The host must see the NIC arrive as it was, never under the pod's name (udev and
    NetworkManager act on arrivals and renames). So it is renamed and reset before it moves:
    in the pod itself, one move, when the pod has no other link of the host name; else (the
    NIC is on the host already, back from a namespace that died, or the pod has a link of that
    name) in a temporary namespace of its own, two moves.
    """
    with contextlib.ExitStack() as undo:
        if link.up:
            netns.set_up(src, link, False, undo=undo)
        named = netns.link_by_name(src, mark.host_ifname)
        if src_path != HOST_NS and (named is None or named.index == link.index):
            work, work_path, moved = src, src_path, link
        else:
            work_path = hold.enter_context(netns.temporary_namespace())
            work = hold.enter_context(netns.open_ns(work_path))
            moved = netns.move(src, link, work, work_path, src_path, undo=undo)
        moved = netns.rename(work, moved, mark.host_ifname, undo=undo)
        if mark.mtu is not None:
            moved = netns.set_mtu(work, moved, mark.mtu, undo=undo)
        if mark.mac is not None:
            moved = netns.set_mac(work, moved, mark.mac, undo=undo)
        if netns.link_by_name(host, mark.host_ifname) is not None:
            raise CniError(
                cni.E_NETLINK,
                f"cannot give {mark.pci_address} back as {mark.host_ifname}",
                f"the host already has a link named {mark.host_ifname}; the NIC stays put",
            )
        moved = netns.move(work, moved, host, HOST_NS, work_path, undo=undo)
        if not mark.was_down:
            netns.set_up(host, moved, True, undo=undo)
        # The mark last: a DEL cut short before this still finds the NIC by it.
        netns.set_alias(host, moved, None, undo=undo)
        undo.pop_all()


# -- CHECK --------------------------------------------------------------------------------------


def _check_failed(msg: str, details: str = "") -> CniError:
    return CniError(cni.E_CHECK, msg, details)


def cmd_check(env: Env, c: Conf, environ: Mapping[str, str]) -> None:
    prev = _check_prev(c)
    if netns.is_own(env.netns):
        raise _own_netns(env)
    # IPAM CHECK starts first and runs alongside ours; ours is reported first.
    pending, ipam_error = _start_ipam("CHECK", env, c, environ)
    try:
        with netns.open_ns(env.netns) as pod:
            _check_pod(env, c, pod, prev)
    except netns.NamespaceNotFound as e:
        if pending is not None:
            pending.wait()
        raise CniError(cni.E_NETNS_MISSING, "CNI_NETNS does not exist", str(e)) from None
    except BaseException:
        if pending is not None:
            pending.wait()
        raise
    if ipam_error is not None:
        raise ipam_error
    if pending is not None:
        pending.result()


def _check_prev(c: Conf) -> res.Result:
    """The prevResult a CHECK checks against; errors for a version without CHECK or a missing
    or unusable prevResult."""
    if cni.version_tuple(c.cni_version) < (0, 4, 0):
        raise CniError(
            cni.E_INCOMPATIBLE_VERSION,
            f"CHECK is not defined for cniVersion {c.cni_version}",
            "CHECK needs cniVersion 0.4.0 or later",
        )
    if c.prev_result is None:
        raise CniError(
            cni.E_INVALID_CONFIG,
            "invalid network configuration: prevResult",
            "CHECK needs the prevResult of the ADD",
        )
    try:
        prev = res.parse(c.prev_result)
    except res.ResultError as e:
        raise CniError(
            cni.E_INVALID_CONFIG, "invalid network configuration: prevResult", str(e)
        ) from None
    return prev


def _check_pod(env: Env, c: Conf, pod: Any, prev: res.Result) -> None:
    link = netns.link_by_name(pod, env.ifname)
    if link is None:
        raise _check_failed(f"{env.ifname} is missing from {env.netns}")
    mark = alias.decode(link.alias)
    if mark is None or (c.pci_address and mark.pci_address != c.pci_address):
        raise _check_failed(
            f"{env.ifname} in {env.netns} is not the NIC this plugin plumbed",
            f"its alias is {link.alias!r}",
        )
    index = next(
        (
            i
            for i, it in enumerate(prev.interfaces)
            if it.name == env.ifname and (not it.sandbox or it.sandbox == env.netns)
        ),
        None,
    )
    if index is None:
        raise _check_failed(f"prevResult lists no interface {env.ifname} in {env.netns}")
    want = prev.interfaces[index]
    if want.mac and want.mac.lower() != link.mac:
        raise _check_failed(f"{env.ifname} has MAC {link.mac}, prevResult says {want.mac}")
    if want.mtu and want.mtu != link.mtu:
        raise _check_failed(f"{env.ifname} has MTU {link.mtu}, prevResult says {want.mtu}")
    if not link.up:
        raise _check_failed(f"{env.ifname} is down")
    have = set(netns.addresses(pod, link.index))
    for ip in prev.ips:
        if ip.interface not in (None, index):
            continue
        if ip.address not in have:
            raise _check_failed(
                f"{env.ifname} lacks address {ip.address}", f"it has {sorted(have) or 'none'}"
            )
    routes = netns.routes(pod)
    gateways = {ip.family: ip.gateway for ip in prev.ips if ip.gateway}
    for r in prev.routes:
        gw = r.gw or gateways.get(6 if ":" in r.dst else 4)
        if not any(have.dst == r.dst and (gw is None or have.gw == gw) for have in routes):
            via = f" via {gw}" if gw else ""
            raise _check_failed(f"route {r.dst}{via} is missing from {env.netns}")


# -- STATUS and GC ------------------------------------------------------------------------------


def _needs_1_1(c: Conf, command: str) -> None:
    if cni.version_tuple(c.cni_version) < (1, 1, 0):
        raise CniError(
            cni.E_INCOMPATIBLE_VERSION,
            f"{command} is not defined for cniVersion {c.cni_version}",
            f"{command} needs cniVersion 1.1.0",
        )


def cmd_status(env: Env, c: Conf, environ: Mapping[str, str]) -> None:
    _needs_1_1(c, "STATUS")
    devices = os.path.join(c.sysfs_root, "bus", "pci", "devices")
    try:
        os.listdir(devices)
    except OSError as e:
        raise CniError(
            cni.E_NOT_AVAILABLE, "cannot read the PCI tree", f"{devices}: {e.strerror}"
        ) from None
    if not c.ipam_type:
        return
    try:
        exe = ipam.find(c.ipam_type, list(env.path))
        versions = ipam.supported_versions(exe, environ)
        if "1.1.0" in versions:
            ipam._exec(exe, "STATUS", environ, c.raw)
    except CniError as e:
        if e.code in (cni.E_NOT_AVAILABLE, 51):
            raise
        raise CniError(cni.E_NOT_AVAILABLE, f"IPAM is not available: {e.msg}", e.details) from None


def cmd_gc(env: Env, c: Conf, environ: Mapping[str, str]) -> None:
    _needs_1_1(c, "GC")
    valid = c.raw.get("cni.dev/valid-attachments", [])
    if not isinstance(valid, list) or not all(
        isinstance(a, dict) and isinstance(a.get("containerID"), str) for a in valid
    ):
        raise CniError(
            cni.E_INVALID_CONFIG,
            "invalid network configuration: cni.dev/valid-attachments",
            "expected a list of {containerID, ifname} objects",
        )
    if not c.ipam_type:
        return
    exe = ipam.find(c.ipam_type, list(env.path))
    if "1.1.0" in ipam.supported_versions(exe, environ):
        ipam._exec(exe, "GC", environ, c.raw)
    else:
        log.info("GC: IPAM plugin %s predates GC (CNI 1.1.0); nothing to forward", c.ipam_type)


# -- dispatch -----------------------------------------------------------------------------------

COMMANDS: Dict[str, Callable[[Env, Conf, Mapping[str, str]], Optional[Dict[str, Any]]]] = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
    "STATUS": cmd_status,
    "GC": cmd_gc,
}


def _open_log(path: str) -> Any:
    """The node policy's log file, for appending: created 0600, never through a symlink, and
    only a regular file (not a device or FIFO; O_NONBLOCK so a FIFO cannot hang the call)."""
    import stat

    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(path, flags, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def _setup_logging(c: Conf) -> None:
    handler: logging.Handler
    fallback = None
    if c.log_file:
        try:
            handler = logging.StreamHandler(_open_log(c.log_file))
        except OSError as e:
            handler = logging.StreamHandler(sys.stderr)
            fallback = (
                f"cannot open logFile {c.log_file} ({c.policy.source}): "
                f"{e.strerror or 'a symlink'}; logging to stderr"
            )
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s ehost-device[%(process)d] %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(c.log_level.upper())
    if fallback:
        log.warning("%s", fallback)


def _own_netns(env: Env) -> CniError:
    return CniError(
        cni.E_INVALID_NETNS,
        "CNI_NETNS is the plugin's own network namespace",
        f"{env.netns} is the namespace the runtime runs the plugin in (the host's); "
        "expected the pod's network namespace",
    )


def _node_policy(env: Env, environ: Mapping[str, str]) -> Tuple[Any, Optional[str]]:
    """(the node policy, a warning to log). An unusable policy file fails every command but
    DEL, which gives NICs back with the built-in defaults instead."""
    from ehost_device import policy
    from virtcore.schema import ConfigError

    try:
        return policy.load(environ), None
    except ConfigError as e:
        if env.command != "DEL":
            raise CniError(
                cni.E_POLICY, "the ehost-device node policy is unusable", str(e)
            ) from None
        return policy.DEFAULTS, f"node policy unusable ({e}); giving the NIC back anyway"


def _peek_version(data: bytes) -> str:
    """The config's cniVersion if it is readable and supported, for an error found earlier."""
    try:
        return cni.requested_version(cni.parse_json(data))
    except CniError:
        return cni.LATEST


def run(environ: Mapping[str, str], data: bytes) -> Tuple[int, Optional[Dict[str, Any]]]:
    """One CNI call: (exit status, JSON object for stdout or None).

    Checked in libcni's order: the environment, then the config on stdin.
    """
    version = cni.LATEST
    try:
        try:
            env = cni.load_env(environ)
        except CniError:
            version = _peek_version(data)
            raise
        obj = cni.parse_json(data)
        version = cni.requested_version(obj)
        node, warning = _node_policy(env, environ)
        if env.command == "DEL":  # a DEL is never blocked: yesterday's config may carry them
            ignored = [k for k in cni.NODE_KEYS if k in obj]
            if ignored:
                warning = warning or (
                    f"network config keys {', '.join(ignored)} ignored: node settings come "
                    f"from {node.source}"
                )
        else:
            cni.refuse_node_keys(obj, node.source)
        c = cni.load_conf(obj, version, node)
        _setup_logging(c)
        if warning:
            log.warning("%s %s: %s", env.command, env.container_id, warning)
        cni.require_path(environ, env.command, needs_ipam=c.ipam_type is not None)
        commands = COMMANDS
        if not c.names_nic or env.command == "DEL":
            from ehost_device import claimed

            # The pod's DRA claims name the NICs; or a DEL whose config names a device now,
            # of an attachment that took NICs by claim.
            if not c.names_nic or claimed.statuses_of(env, c):
                commands = claimed.COMMANDS
        try:
            out = commands[env.command](env, c, environ)
        except netns.NetnsError as e:
            raise CniError(cni.E_NETLINK, f"{env.command} failed", str(e)) from None
        return 0, out
    except CniError as e:
        log.error("%s", f"{e.msg}: {e.details}" if e.details else e.msg)
        return 1, e.to_json(version)
    except Exception as e:  # never a traceback on stdout: the runtime reads JSON there
        log.exception("unexpected failure")
        return 1, CniError(999, "internal error in ehost-device", repr(e)).to_json(version)
