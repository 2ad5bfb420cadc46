"""Netlink sockets in other namespaces, made without forking: a short-lived thread enters the
namespace, makes the socket and ends (virtcore.netlink.socket_in), in-process and in the warm
executor alike.

"No fork" is observed, not assumed: the kernel adds a reaped child's page faults and CPU time
to its parent's `cminflt`/`cmajflt`/`cutime`/`cstime` (/proc/<pid>/stat), and every process
that ever ran faults, so those counters stand still only while no child ran. The observation is
checked to see a child (an IPAM plugin run) before it is trusted to see none.
"""

from __future__ import annotations

import os
import threading
from typing import Tuple

import pytest
from conftest import Rig
from netlab import Netns, ip, tag, veth

from virtcore import netlink, netns

PCI = "0000:00:05.0"


def _children_counters(pid: int) -> Tuple[int, ...]:
    """(cminflt, cmajflt, cutime, cstime) of process `pid`: what its reaped children cost."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 11, 13, 16 and 17 of proc(5), which counts from 1 with pid and comm before ")".
    return tuple(int(fields[i]) for i in (8, 10, 13, 14))


def _children(pid: int) -> str:
    out = ""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += f.read()
    return out.strip()


def _own_ns() -> Tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


def test_socket_made_in_a_pod_namespace_sees_and_changes_that_namespace():
    with Netns("nsa") as a, Netns("nsb") as b:
        veth(a, "inside0", b, "outside0", up=False)
        before = _own_ns()
        with netns.open_ns(a.path) as sock:
            assert sorted(link.name for link in netns.links(sock)) == ["inside0", "lo"]
            link = netns.link_by_name(sock, "inside0")
            assert link is not None and link.kind == "veth"
            assert netns.link_by_name(sock, "outside0") is None  # the peer's namespace
            netns.set_alias(sock, link, "seen-from-a")
            netns.add_address(sock, link, "198.51.100.7/24")
        assert _own_ns() == before  # the calling thread never moved
        shown = ip("-o", "link", "show", "inside0", ns=a.name).stdout
        assert "alias seen-from-a" in shown
        assert "198.51.100.7/24" in ip("-o", "addr", "show", "inside0", ns=a.name).stdout
        assert "198.51.100.7" not in ip("-o", "addr", "show", ns=b.name).stdout

        # The executor's way in: the namespace pinned as an open descriptor; the path named in
        # messages means nothing in this mount namespace.
        fd = os.open(a.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with netns.pinned("/no/such/netns", fd), netns.open_ns("/no/such/netns") as sock:
                found = netns.link_by_name(sock, "inside0")
                assert found is not None and found.alias == "seen-from-a"
        finally:
            os.close(fd)

        # netlink.snapshot reads a named namespace the same way.
        snap = netlink.snapshot(netns=b.path)
        assert sorted(link.name for link in snap.links) == ["lo", "outside0"]


def test_missing_or_wrong_namespace_raises_as_before_and_creates_nothing(tmp_path):
    missing = f"/var/run/netns/gone-{tag(8)}"
    with pytest.raises(netns.NamespaceNotFound, match="does not exist"):
        with netns.open_ns(missing):
            pass
    assert not os.path.exists(missing)  # never created
    with pytest.raises(netlink.NetlinkReadError, match="does not exist"):
        netlink.snapshot(netns=missing)
    assert not os.path.exists(missing)

    plain = tmp_path / "not-a-namespace"
    plain.write_text("x")
    with pytest.raises(netns.NamespaceNotFound, match="not a network namespace"):
        with netns.open_ns(str(plain)):
            pass
    with pytest.raises(netns.NamespaceNotFound, match="cannot enter"):
        with netns.open_ns("/proc/self/ns/uts"):  # nsfs, but not a network namespace
            pass
    # The executor's front could not open CNI_NETNS: the errno it got, as in-process.
    with netns.pinned(missing, None, 2), pytest.raises(netns.NamespaceNotFound, match="exist"):
        with netns.open_ns(missing):
            pass


def test_no_process_is_forked_in_process():
    """Namespace sockets, a temporary namespace and a move through it, in this process: its
    reaped-children counters stand still (and do move when a child does run)."""
    with Netns("nsc") as a, Netns("nsd") as b:
        veth(a, "mv0", b, f"p{tag(6)}", up=False)
        ran = _children_counters(os.getpid())
        ip("link", "show", ns=a.name)
        assert _children_counters(os.getpid()) != ran, "a child that ran went unseen"

        before = _children_counters(os.getpid())
        with netns.open_ns(a.path) as src, netns.temporary_namespace() as tmp:
            with netns.open_ns(tmp) as work:
                link = netns.link_by_name(src, "mv0")
                assert link is not None
                moved = netns.move(src, link, work, tmp, a.path, name="mv1")
                assert [x.name for x in netns.links(work)] == ["lo", "mv1"]
                netns.move(work, moved, src, a.path, tmp, name="mv0")
        assert _children_counters(os.getpid()) == before
        assert "mv0" in a.links()
        assert not [t for t in threading.enumerate() if t.name == "netns"]  # all ended


@pytest.mark.parametrize("rig", ["executor"], indirect=True)
def test_no_process_is_forked_by_the_executor(rig: Rig):
    """ADD, CHECK and DEL through the executor (DEL via a temporary namespace: the pod has a
    link of the NIC's host name) fork nothing; the one call with IPAM shows the observation
    works."""
    assert rig.executor is not None and rig.executor.proc is not None
    pid = rig.executor.proc.pid
    rig.nic(PCI, "ens5")
    before_state = rig.state("ens5")
    pod = rig.pod()
    ip("link", "add", "ens5", "type", "veth", "peer", "name", f"p{tag(6)}", ns=pod.name)

    conf = rig.conf("1.0.0", deviceID=PCI)
    out = rig.cni("ADD", conf, pod=pod).ok()  # host-local IPAM: a child runs
    rig.cni("DEL", conf, pod=pod).ok()
    assert rig.state("ens5") == before_state

    bare = {k: v for k, v in conf.items() if k != "ipam"}
    before = _children_counters(pid)
    assert before != (0, 0, 0, 0), "the IPAM plugin's run went unseen"
    out = rig.cni("ADD", bare, pod=pod).ok()
    assert rig.state("net1", pod)["up"]
    rig.cni("CHECK", dict(bare, prevResult=out), pod=pod).ok()
    rig.cni("DEL", dict(bare, prevResult=out), pod=pod).ok()
    assert _children_counters(pid) == before
    assert _children(pid) == ""
    assert rig.state("ens5") == before_state
    assert rig.executor.calls()[-3:] == ["ADD", "CHECK", "DEL"]
