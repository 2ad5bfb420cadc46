"""Health follows rtnetlink link events (no rescan, no probe): carrier loss and recovery,
admin-down spares, NICs in pods."""

from __future__ import annotations

import time

RES = "kernel.org/virt"
A, B = "0000:00:0a.0", "0000:00:0b.0"


def test_carrier_loss_and_recovery(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    lab.kubelet.start()
    lab.start(metrics=True)
    lab.kubelet.wait_registered(RES)
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Healthy"})

    lab.cable("ens11", False)
    # The latency is a benchmark figure (bench/serve.py); here: it comes from the link event.
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Unhealthy"}, timeout=5)

    lab.cable("ens11", True)
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Healthy"}, timeout=5)
    # The link events alone did it: no full rescan, not even a single-device re-read.
    assert lab.metric('virtdp_rescans_total{reason="start"}') == 1
    assert (
        sum(
            lab.metric(f'virtdp_rescans_total{{reason="{r}"}}')
            for r in ("resync", "overflow", "config", "kubelet", "route")
        )
        == 0
    )
    assert lab.metric('virtdp_device_refreshes_total{source="link"}') == 0


def test_updates_only_on_change(lab):
    lab.add_nic(A, "ens10")
    lab.kubelet.start()
    lab.start()
    lab.kubelet.wait_registered(RES)
    first = lab.kubelet.update_count(RES)
    time.sleep(3.5)  # at rest: nothing is sent
    assert lab.kubelet.update_count(RES) == first
    lab.cable("ens10", False)
    lab.kubelet.wait_health(RES, {A: "Unhealthy"})
    time.sleep(1.5)
    assert lab.kubelet.update_count(RES) == first + 1


def test_admin_down_spare_is_healthy(lab):
    lab.add_nic(A, "ens10", up=False)
    lab.kubelet.start()
    lab.start()
    lab.kubelet.wait_registered(RES)
    lab.kubelet.wait_health(RES, {A: "Healthy"})
    # Brought up with its cable in: still healthy; cable pulled while up: unhealthy.
    lab.link_admin("ens10", True)
    time.sleep(0.5)
    assert lab.kubelet.health(RES) == {A: "Healthy"}
    lab.cable("ens10", False)
    lab.kubelet.wait_health(RES, {A: "Unhealthy"})
    lab.link_admin("ens10", False)  # a spare again
    lab.kubelet.wait_health(RES, {A: "Healthy"})


def test_nic_in_a_pod_keeps_its_state(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    lab.write_config("""
pools:
  - resourceName: kernel.org/virt
    selectors:
      ifNames: [ens10, ens11]
""")
    lab.kubelet.start()
    lab.start(config=True)
    lab.kubelet.wait_registered(RES)
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Healthy"})
    lab.cable("ens11", False)
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Unhealthy"})

    lab.move_to_pod(A, "ens10")
    lab.move_to_pod(B, "ens11")
    time.sleep(2.5)  # link events and rescans have seen both netdevs leave
    assert lab.kubelet.health(RES) == {A: "Healthy", B: "Unhealthy"}
    assert "left pool" not in lab.log()
