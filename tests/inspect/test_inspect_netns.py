"""Finding plumbed NICs by ehost-device's mark in real network namespaces: named ones, those
only a process holds, both at once (counted once), and namespace files that are not live."""

from __future__ import annotations

import os
import subprocess
import time

from inspectlab import host_nic, inspect, inspect_json, pci_domain, plumb, wait_operstate
from netlab import ip, namespaces, run, tag

from virtcore import plumbed
from virtcore.alias import Mark


def _wait_for_netns_change(pid: int) -> None:
    mine = os.stat("/proc/self/ns/net").st_ino
    for _ in range(100):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino != mine:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} never entered its own network namespace")


def test_named_namespaces_marked_links_only_with_addresses(tmp_path):
    pci = f"{pci_domain()}:00:0a.0"
    with namespaces("vih", "vip", "vix") as (host, pod, peers):
        host_nic(host, peers, "ens5")
        host_nic(host, peers, "ens6")
        mark = plumb(
            host, pod, "ens5", pci, "net1", addresses=["198.51.100.7/24", "2001:db8::7/64"]
        )
        # Links in the same namespace that are not ehost-device's: unmarked, another tool's
        # alias, a damaged mark.
        ip("link", "set", "ens6", "netns", pod.name, ns=host.name)
        ip("link", "set", "ens6", "alias", "host-device: was eth3", ns=pod.name)
        host_nic(pod, peers, "eth0")
        host_nic(pod, peers, "net2")
        ip("link", "set", "net2", "alias", "virtdp/v1 host=ens9", ns=pod.name)  # no pci=

        wait_operstate(pod, "net1")
        doc, proc = inspect_json("netns")
        assert proc.returncode == 0, proc.stderr
        mine = [r for r in doc["nics"] if r["netns"] == pod.name]
        assert len(mine) == 1, doc
        row = mine[0]
        assert row["netns_path"] == pod.path
        assert row["netns_inode"] == os.stat(pod.path).st_ino
        assert (row["ifname"], row["host_ifname"], row["pci_address"]) == ("net1", "ens5", pci)
        assert "198.51.100.7/24" in row["addresses"] and "2001:db8::7/64" in row["addresses"]
        assert row["admin_up"] is True and row["operstate"] == "up"
        assert (row["original_mtu"], row["original_mac"], row["was_down"]) == (None, None, False)
        assert mark.encode().startswith("virtdp/v1 host=ens5")
        assert doc["namespaces_scanned"] >= 3
        assert not [r for r in doc["nics"] if r["netns"] in (host.name, peers.name)]

        table = inspect("netns")
        line = [x for x in table.stdout.splitlines() if pod.name in x]
        assert len(line) == 1 and "net1" in line[0] and "ens5" in line[0] and pci in line[0]

        # Unplumbed (ehost-device DEL): the link goes home, renamed back, mark cleared.
        ip("link", "set", "net1", "alias", "", ns=pod.name)
        doc, _ = inspect_json("netns")
        assert not [r for r in doc["nics"] if r["netns"] == pod.name]


def test_process_namespace_is_found_and_shared_namespaces_count_once():
    pci = f"{pci_domain()}:00:0b.0"
    with namespaces("vih", "vix") as (host, peers):
        host_nic(host, peers, "ens7")
        # An unnamed namespace only a process holds, as a container runtime without netns
        # files leaves it.
        proc = subprocess.Popen(["unshare", "--net", "sleep", "60"])
        # A named namespace a process also lives in.
        named = subprocess.Popen(["ip", "netns", "exec", peers.name, "sleep", "60"])
        try:
            _wait_for_netns_change(proc.pid)
            _wait_for_netns_change(named.pid)
            ip("link", "set", "ens7", "netns", str(proc.pid), ns=host.name)
            name = f"n{tag(6)}"
            enter = ["nsenter", "-t", str(proc.pid), "-n", "ip", "link", "set", "ens7"]
            run(*enter, "name", name)
            run(*(enter[:-1] + [name]), "alias", Mark("ens7", pci, mtu=9000).encode())

            scan = plumbed.scan()
            inode = os.stat(f"/proc/{proc.pid}/ns/net").st_ino
            found = [n for n in scan.nics if n.netns.inode == inode]
            assert len(found) == 1, scan
            nic = found[0]
            assert (nic.ifname, nic.host_ifname, nic.pci_address) == (name, "ens7", pci)
            assert nic.mark.mtu == 9000
            assert nic.netns.pid == proc.pid and nic.netns.names == ()
            assert nic.netns.label == f"pid:{proc.pid}(sleep)"
            assert nic.netns.path == f"/proc/{proc.pid}/ns/net"

            shared = [n for n in scan.namespaces if n.inode == os.stat(peers.path).st_ino]
            assert len(shared) == 1
            assert shared[0].names == (peers.name,) and shared[0].path == peers.path
            assert shared[0].pid is not None
            assert len({n.inode for n in scan.namespaces}) == len(scan.namespaces)
            current = [n for n in scan.namespaces if n.is_current]
            assert len(current) == 1

            doc, _ = inspect_json("netns")
            rows = [r for r in doc["nics"] if r["netns_inode"] == inode]
            assert [(r["netns"], r["ifname"], r["pid"]) for r in rows] == [
                (f"pid:{proc.pid}(sleep)", name, proc.pid)
            ]
        finally:
            for p in (proc, named):
                p.kill()
                p.wait()


def test_netns_dir_entries_that_are_not_live_namespaces_are_reported(tmp_path):
    d = tmp_path / "netns"
    d.mkdir()
    (d / "stale").write_text("")  # what `ip netns` leaves when the mount is gone
    with namespaces("vip", "vix") as (pod, peers):
        host_nic(pod, peers, "net1")
        ip("link", "set", "net1", "alias", Mark("ens8", "0000:00:0c.0").encode(), ns=pod.name)
        os.symlink(pod.path, d / "linked")
        scan = plumbed.scan(str(d), processes=False)
        assert [n.label for n in scan.namespaces] == ["linked"]
        assert [(n.netns.label, n.ifname) for n in scan.nics] == [("linked", "net1")]
        assert (
            len(scan.problems) == 1 and "stale: not a mounted network namespace" in scan.problems[0]
        )

        proc = inspect("netns", "--netns-dir", str(d), "-o", "yaml")
        assert proc.returncode == 0
        assert "stale file" in proc.stderr and "netns: linked" in proc.stdout
