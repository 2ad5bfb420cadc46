"""CNI results: reading an IPAM result or a prevResult, and writing one per requested version.

0.3.x/0.4.0 results carry `version: "4"|"6"` on each IP; 1.0.0 drops it; 1.1.0 adds `mtu`,
`pciID` and `socketPath` on interfaces and `mtu`, `advmss`, `priority`, `table` and `scope` on
routes. Parsing accepts any of them and checks every address, so nothing unusable reaches
netlink.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ehost_device.conf import version_tuple


class ResultError(ValueError):
    """A result that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Interface:
    name: str
    mac: Optional[str] = None
    mtu: Optional[int] = None
    sandbox: Optional[str] = None
    pci_id: Optional[str] = None
    socket_path: Optional[str] = None


@dataclass(frozen=True)
class IP:
    address: str  # CIDR, as the kernel will be given it
    gateway: Optional[str] = None
    interface: Optional[int] = None

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4


@dataclass(frozen=True)
class RouteSpec:
    dst: str
    gw: Optional[str] = None
    mtu: Optional[int] = None
    advmss: Optional[int] = None
    priority: Optional[int] = None
    table: Optional[int] = None
    scope: Optional[int] = None


@dataclass(frozen=True)
class Result:
    interfaces: Tuple[Interface, ...] = ()
    ips: Tuple[IP, ...] = ()
    routes: Tuple[RouteSpec, ...] = ()
    dns: Dict[str, Any] = field(default_factory=dict)


def _uint(obj: Dict[str, Any], key: str, where: str) -> Optional[int]:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ResultError(f"{where}.{key} is {v!r}, expected an unsigned integer")
    return v


def parse(obj: Any) -> Result:
    """A Result from result JSON of any supported version. Raises ResultError."""
    if not isinstance(obj, dict):
        raise ResultError(f"expected a JSON object, got {type(obj).__name__}")
    interfaces = []
    for i, it in enumerate(obj.get("interfaces") or []):
        where = f"interfaces[{i}]"
        if not isinstance(it, dict) or not isinstance(it.get("name"), str):
            raise ResultError(f"{where} has no name")
        interfaces.append(
            Interface(
                name=it["name"],
                mac=it.get("mac"),
                mtu=_uint(it, "mtu", where),
                sandbox=it.get("sandbox"),
                pci_id=it.get("pciID"),
                socket_path=it.get("socketPath"),
            )
        )
    ips = []
    for i, ip in enumerate(obj.get("ips") or []):
        where = f"ips[{i}]"
        if not isinstance(ip, dict):
            raise ResultError(f"{where} is not an object")
        addr = ip.get("address")
        try:
            iface = ipaddress.ip_interface(addr)  # type: ignore[arg-type]
        except ValueError:
            raise ResultError(
                f"{where}.address is {addr!r}, expected an IP address in CIDR form"
            ) from None
        if "/" not in str(addr):
            raise ResultError(f"{where}.address is {addr!r}, expected a prefix length too")
        gw = ip.get("gateway")
        if gw:
            try:
                gwa = ipaddress.ip_address(gw)
            except ValueError:
                raise ResultError(f"{where}.gateway is {gw!r}, expected an IP address") from None
            if gwa.version != iface.version:
                raise ResultError(f"{where}.gateway {gw} is not of the address's IP version")
        ips.append(
            IP(address=str(iface), gateway=gw or None, interface=_uint(ip, "interface", where))
        )
    routes = []
    for i, r in enumerate(obj.get("routes") or []):
        where = f"routes[{i}]"
        if not isinstance(r, dict):
            raise ResultError(f"{where} is not an object")
        try:
            dst = ipaddress.ip_network(r.get("dst"), strict=False)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            raise ResultError(f"{where}.dst is {r.get('dst')!r}, expected a CIDR") from None
        gw = r.get("gw")
        if gw:
            try:
                if ipaddress.ip_address(gw).version != dst.version:
                    raise ResultError(f"{where}.gw {gw} is not of the destination's IP version")
            except ValueError:
                raise ResultError(f"{where}.gw is {gw!r}, expected an IP address") from None
        routes.append(
            RouteSpec(
                dst=str(dst),
                gw=gw or None,
                mtu=_uint(r, "mtu", where),
                advmss=_uint(r, "advmss", where),
                priority=_uint(r, "priority", where),
                table=_uint(r, "table", where),
                scope=_uint(r, "scope", where),
            )
        )
    dns = obj.get("dns") or {}
    if not isinstance(dns, dict):
        raise ResultError(f"dns is {dns!r}, expected an object")
    return Result(tuple(interfaces), tuple(ips), tuple(routes), dns)


def render(result: Result, cni_version: str) -> Dict[str, Any]:
    """The result JSON object in the shape of `cni_version`."""
    v = version_tuple(cni_version)
    v11 = v >= (1, 1, 0)
    out: Dict[str, Any] = {"cniVersion": cni_version}
    ifaces: List[Dict[str, Any]] = []
    for it in result.interfaces:
        d: Dict[str, Any] = {"name": it.name}
        if it.mac:
            d["mac"] = it.mac
        if v11 and it.mtu:
            d["mtu"] = it.mtu
        if it.sandbox:
            d["sandbox"] = it.sandbox
        if v11 and it.socket_path:
            d["socketPath"] = it.socket_path
        if v11 and it.pci_id:
            d["pciID"] = it.pci_id
        ifaces.append(d)
    if ifaces:
        out["interfaces"] = ifaces
    ips = []
    for ip in result.ips:
        d = {}
        if v < (1, 0, 0):
            d["version"] = str(ip.family)
        d["address"] = ip.address
        if ip.gateway:
            d["gateway"] = ip.gateway
        if ip.interface is not None:
            d["interface"] = ip.interface
        ips.append(d)
    if ips:
        out["ips"] = ips
    routes = []
    for r in result.routes:
        d = {"dst": r.dst}
        if r.gw:
            d["gw"] = r.gw
        if v11:
            for key in ("mtu", "advmss", "priority", "table", "scope"):
                val = getattr(r, key)
                if val is not None:
                    d[key] = val
        routes.append(d)
    if routes:
        out["routes"] = routes
    out["dns"] = result.dns
    return out
