"""The advertised inventory follows hot-plug, hot-unplug and driver unbind/bind, without a
restart."""

from __future__ import annotations

from netlab import ip

RES = "kernel.org/virt"
A, B = "0000:00:0a.0", "0000:00:0b.0"


def test_hot_plug_and_unplug(lab):
    lab.add_nic(A, "ens10")
    lab.kubelet.start()
    lab.start()
    lab.kubelet.wait_registered(RES)
    lab.kubelet.wait_health(RES, {A: "Healthy"})

    lab.add_nic(B, "ens11", numa_node=0)  # the link appears first, then its PCI function
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Healthy"}, timeout=5)
    assert lab.kubelet.devices[RES][B].numa_nodes == (0,)

    lab.sysfs.remove_nic(A)  # unplug: the PCI function and its netdev go
    ip("link", "del", "ens10", ns=lab.node.name)
    lab.kubelet.wait_health(RES, {B: "Healthy"}, timeout=5)
    assert lab.proc.poll() is None


def test_unplug_without_any_link_event(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    lab.kubelet.start()
    lab.start()
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Healthy"})
    lab.sysfs.remove_nic(B)  # only sysfs changes: the periodic rescan notices
    lab.kubelet.wait_health(RES, {A: "Healthy"}, timeout=5)


def test_driver_unbind_and_bind(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    lab.kubelet.start()
    lab.start()
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Healthy"})
    lab.sysfs.unbind_driver(B)
    lab.kubelet.wait_health(RES, {A: "Healthy"}, timeout=5)
    lab.sysfs.bind_driver(B, "ens11")
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Healthy"}, timeout=5)
