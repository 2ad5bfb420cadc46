"""The advertised inventory follows hot-plug, hot-unplug and driver unbind/bind without a restart,
driven by kernel events: the test changes the fake PCI tree, then makes the kernel emit a real
uevent for the NIC's netdev (in the daemon's namespace). An event re-reads only the device it
names; `virtdp_rescans_total` shows that no full rescan ran. The full rescan is the safety net
(`--resync-interval`) and the answer to an event socket overflow."""

from __future__ import annotations

import subprocess

from netlab import ip

RES = "kernel.org/virt"
A, B, C = "0000:00:0a.0", "0000:00:0b.0", "0000:00:0c.0"
REASONS = ("start", "resync", "overflow", "config", "kubelet", "route")


def rescans(lab):
    return {r: lab.metric(f'virtdp_rescans_total{{reason="{r}"}}') for r in REASONS}


ONLY_START = {r: (1.0 if r == "start" else 0.0) for r in REASONS}


def _start(lab, *extra):
    lab.kubelet.start()
    lab.start(*extra, metrics=True)
    lab.kubelet.wait_registered(RES)


def test_hot_plug_and_unplug_by_uevent(lab):
    lab.add_nic(A, "ens10")
    _start(lab)
    lab.kubelet.wait_health(RES, {A: "Healthy"})

    # Hot-plug: the netdev appears (a link event: not a device of a PCI function yet), then
    # the PCI tree shows it, and the kernel announces the netdev.
    lab.add_nic(B, "ens11", numa_node=0)
    lab.uevent("ens11", "add")
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Healthy"}, timeout=5)
    assert lab.kubelet.devices[RES][B].numa_nodes == (0,)

    # Unplug: the function and its netdev go from sysfs; the kernel announces the removal.
    lab.sysfs.remove_nic(A)
    lab.uevent("ens10", "remove")
    lab.kubelet.wait_health(RES, {B: "Healthy"}, timeout=5)

    assert rescans(lab) == ONLY_START
    assert lab.metric('virtdp_device_refreshes_total{source="uevent"}') >= 2
    assert lab.proc.poll() is None


def test_driver_unbind_and_bind_by_uevent(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    _start(lab)
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Healthy"})
    lab.sysfs.unbind_driver(B)
    lab.uevent("ens11", "remove")
    lab.kubelet.wait_health(RES, {A: "Healthy"}, timeout=5)
    lab.sysfs.bind_driver(B, "ens11")
    lab.uevent("ens11", "add")
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Healthy"}, timeout=5)
    # A "change" with nothing changed sends nothing new.
    updates = lab.kubelet.update_count(RES)
    lab.uevent("ens10", "change")
    lab.kubelet.wait(
        lambda: lab.metric('virtdp_device_refreshes_total{source="uevent"}') >= 3, 5, "refresh"
    )
    assert lab.kubelet.update_count(RES) == updates
    assert rescans(lab) == ONLY_START


def test_renamed_netdev_is_followed_by_its_link_event(lab):
    lab.add_nic(A, "ens10")
    _start(lab)
    lab.kubelet.wait_health(RES, {A: "Healthy"})
    lab.sysfs.rename_netdev(A, "dev7")
    ip("link", "set", "ens10", "down", ns=lab.node.name)
    ip("link", "set", "ens10", "name", "dev7", ns=lab.node.name)
    ip("link", "set", "dev7", "up", ns=lab.node.name)
    lab.cable("ens10", False)  # the far end keeps its name
    lab.kubelet.wait_health(RES, {A: "Unhealthy"}, timeout=5)
    assert rescans(lab) == ONLY_START


def test_resync_is_the_safety_net(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    _start(lab, "--resync-interval", "1")
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Healthy"})
    lab.sysfs.remove_nic(B)  # only sysfs changes, no event: the resync notices
    lab.kubelet.wait_health(RES, {A: "Healthy"}, timeout=5)
    assert rescans(lab)["resync"] >= 1


def test_event_overflow_resyncs_and_the_kubelet_ends_right(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    _start(lab, "--event-buffer", "4096")
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Healthy"})
    # While the burst runs: a NIC appears in the tree with no event of its own, and B loses
    # its carrier; their events may be among those lost.
    lab.add_nic(C, "ens12")
    burst = "".join(
        f"link add x{i} type veth peer name y{i}\nlink set x{i} up\nlink set y{i} up\n"
        f"link set x{i} down\n"
        for i in range(1500)
    )
    subprocess.run(["ip", "-n", lab.node.name, "-batch", "-"], input=burst, text=True, check=True)
    lab.cable("ens11", False)
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Unhealthy", C: "Healthy"}, timeout=20)
    lab.kubelet.wait(lambda: rescans(lab)["overflow"] >= 1, 10, "an overflow rescan")
    assert lab.metric('virtdp_event_overflows_total{socket="rtnetlink"}') >= 1
    assert rescans(lab)["resync"] == 0
    lab.wait_log("events were lost (socket overflow): rescanning everything")
    assert lab.proc.poll() is None
