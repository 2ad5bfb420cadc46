"""Helpers for the virtdp-inspect tests: running the tool, a small real DevicePlugin server, the
sockets that misbehave (hangs, speaks something else, refuses), and NICs plumbed into real
namespaces the way ehost-device leaves them.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import threading
from concurrent import futures
from typing import Iterable, List, Optional, Sequence, Tuple

import grpc
from netlab import Netns, ip, veth
from toolrun import tool_command

from virtcore.alias import Mark
from virtcore.kubelet import deviceplugin_pb2, deviceplugin_pb2_grpc


def inspect(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        tool_command("virtdp-inspect") + list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def inspect_json(*args: str) -> Tuple[dict, subprocess.CompletedProcess]:
    proc = inspect(*args, "-o", "json")
    assert proc.stdout, f"no output; rc={proc.returncode} stderr={proc.stderr}"
    return json.loads(proc.stdout), proc


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error line of a failed run; asserts it is one line and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) >= 1, proc.stderr
    return errors[0]


def pci_domain() -> str:
    """A random PCI domain, so PCI addresses in these tests never meet another test's marks."""
    return f"{random.randint(0x1000, 0xFFFF):04x}"


# -- a DevicePlugin that speaks v1beta1 ------------------------------------------------------
class _Plugin(deviceplugin_pb2_grpc.DevicePluginServicer):
    def __init__(self, devices: Sequence[deviceplugin_pb2.Device], pre_start: bool) -> None:
        self.devices = list(devices)
        self.pre_start = pre_start
        self.stop = threading.Event()

    def GetDevicePluginOptions(self, request, context):  # noqa: N802
        return deviceplugin_pb2.DevicePluginOptions(
            pre_start_required=self.pre_start, get_preferred_allocation_available=True
        )

    def ListAndWatch(self, request, context):  # noqa: N802
        yield deviceplugin_pb2.ListAndWatchResponse(devices=self.devices)
        # Like a real plugin: keep the stream open until the client goes away.
        while context.is_active() and not self.stop.wait(0.05):
            pass


def device(dev_id: str, health: str = "Healthy", numa: Optional[int] = None):
    d = deviceplugin_pb2.Device(ID=dev_id, health=health)
    if numa is not None:
        d.topology.nodes.add(ID=numa)
    return d


class DevicePluginServer:
    def __init__(
        self, socket_path: str, devices: Iterable[deviceplugin_pb2.Device], pre_start=False
    ) -> None:
        self.socket_path = socket_path
        self.servicer = _Plugin(list(devices), pre_start)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        deviceplugin_pb2_grpc.add_DevicePluginServicer_to_server(self.servicer, self.server)
        self.server.add_insecure_port("unix://" + socket_path)

    def __enter__(self) -> DevicePluginServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.servicer.stop.set()
        self.server.stop(grace=None).wait(5)
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)


# -- sockets that misbehave -------------------------------------------------------------------
class RawSocketServer:
    """A unix socket server that `hang`s (accepts, never answers) or speaks `http1` and closes."""

    def __init__(self, socket_path: str, behaviour: str) -> None:
        assert behaviour in ("hang", "http1")
        self.socket_path = socket_path
        self.behaviour = behaviour
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(socket_path)
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.held: List[socket.socket] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self.behaviour == "hang":
                self.held.append(conn)
            else:
                try:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                finally:
                    conn.close()

    def __enter__(self) -> RawSocketServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(5)
        for c in self.held:
            c.close()
        self.sock.close()
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)


def refusing_socket(path: str) -> None:
    """A socket file nobody listens on (a server that died without cleaning up)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()


# -- NICs as ehost-device leaves them ---------------------------------------------------------
def host_nic(host: Netns, peers: Netns, ifname: str, mac: Optional[str] = None) -> None:
    """A 'physical' NIC in the test's host namespace: a veth whose peer is in `peers`."""
    veth(host, ifname, peers, f"p{random.randint(0, 1 << 30):x}"[:15], mac=mac)


def plumb(
    host: Netns,
    pod: Netns,
    host_ifname: str,
    pci_address: str,
    pod_ifname: str,
    *,
    addresses: Sequence[str] = (),
) -> Mark:
    """What ehost-device's ADD leaves: the NIC in the pod's namespace under CNI_IFNAME, marked
    in its alias with where it came from, addressed and up."""
    mark = Mark(host_ifname=host_ifname, pci_address=pci_address)
    ip("link", "set", host_ifname, "netns", pod.name, ns=host.name)
    ip("link", "set", host_ifname, "name", pod_ifname, ns=pod.name)
    ip("link", "set", pod_ifname, "alias", mark.encode(), ns=pod.name)
    for a in addresses:
        ip("addr", "add", a, "dev", pod_ifname, ns=pod.name)
    ip("link", "set", pod_ifname, "up", ns=pod.name)
    return mark


def wait_operstate(ns: Netns, ifname: str, state: str = "UP", timeout: float = 5) -> None:
    """The kernel settles operstate asynchronously (linkwatch) after a link comes up."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        link = json.loads(ip("-j", "link", "show", ifname, ns=ns.name).stdout)[0]
        if link.get("operstate") == state:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{ifname} in {ns.name} stayed {link.get('operstate')}")
        time.sleep(0.02)
