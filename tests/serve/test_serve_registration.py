"""virtdp-serve registers each pool with the kubelet and lists its NICs by PCI address."""

from __future__ import annotations

import stat
import time

RES = "kernel.org/virt"


def test_registers_and_lists_nics_with_numa(lab):
    lab.add_nic("0000:00:0a.0", "ens10", numa_node=0)
    lab.add_nic("0000:00:0b.0", "ens11", numa_node=-1)
    lab.add_nic("0000:00:0c.0", "ens12", numa_node=1, legacy=True)
    lab.kubelet.start()
    lab.start()
    ep = lab.kubelet.wait_registered(RES)

    ts, req = [r for r in lab.kubelet.registrations if r[1].resource_name == RES][-1]
    assert req.version == "v1beta1"
    assert req.endpoint == "kernel.org_virt.sock"
    assert req.options.get_preferred_allocation_available
    assert not req.options.pre_start_required
    assert ep.options.get_preferred_allocation_available
    assert stat.S_ISSOCK(lab.socket_path(RES).stat().st_mode)

    devs = lab.kubelet.devices[RES]
    assert sorted(devs) == ["0000:00:0a.0", "0000:00:0b.0", "0000:00:0c.0"]
    assert all(d.health == "Healthy" for d in devs.values())
    assert devs["0000:00:0a.0"].numa_nodes == (0,)
    assert devs["0000:00:0b.0"].numa_nodes == ()
    assert devs["0000:00:0c.0"].numa_nodes == (1,)


def test_ineligible_functions_are_not_advertised(lab):
    lab.add_nic("0000:00:0a.0", "ens10")
    lab.add_nic("0000:00:0b.0", "ens11")
    lab.sysfs.unbind_driver("0000:00:0b.0")  # no virtio_net: not a usable NIC
    lab.sysfs.add_non_virtio_nic("0000:00:0d.0", "enp0s13")
    lab.kubelet.start()
    lab.start()
    lab.kubelet.wait_registered(RES)
    assert sorted(lab.kubelet.devices[RES]) == ["0000:00:0a.0"]


def test_multi_pool_config_one_socket_per_pool(lab):
    lab.add_nic("0000:00:0a.0", "ens10")
    lab.add_nic("0000:00:0b.0", "ens11", legacy=True)
    lab.add_nic("0000:00:0c.0", "ens12")
    lab.write_config("""
pools:
  - resourceName: example.com/fast
    selectors:
      pciAddresses: ["0000:00:0c.0"]
  - resourceName: example.com/legacy
    selectors:
      devices: ["1000"]
  - resourceName: example.com/rest
""")
    lab.kubelet.start()
    lab.start(config=True)
    for res in ("example.com/fast", "example.com/legacy", "example.com/rest"):
        lab.kubelet.wait_registered(res)
        assert lab.socket_path(res).exists()
    assert sorted(lab.kubelet.devices["example.com/fast"]) == ["0000:00:0c.0"]
    assert sorted(lab.kubelet.devices["example.com/legacy"]) == ["0000:00:0b.0"]
    assert sorted(lab.kubelet.devices["example.com/rest"]) == ["0000:00:0a.0"]
    assert "kernel.org/virt" not in lab.kubelet.endpoints


def test_kubelet_absent_then_present(lab):
    lab.add_nic("0000:00:0a.0", "ens10")
    lab.start(metrics=True)
    lab.wait_log("cannot register with the kubelet yet")
    status, body = _http_when_up(lab, "/readyz")
    assert status == 503 and RES in body
    time.sleep(3)  # several retries while absent: the wait is logged once, not per attempt
    assert lab.log().count("cannot register with the kubelet yet") == 1
    assert lab.log().count("still waiting") == 0
    assert lab.socket_path(RES).exists(), "serves before registering"

    started = time.monotonic()
    lab.kubelet.start()
    lab.kubelet.wait_registered(RES, timeout=5)
    assert time.monotonic() - started < 2.0
    assert sorted(lab.kubelet.devices[RES]) == ["0000:00:0a.0"]
    _wait_ready(lab)
    assert lab.http("/readyz") == (200, "ready: 1 pools registered\n")
    assert lab.http("/healthz")[0] == 200


def test_metrics_endpoint(lab):
    lab.add_nic("0000:00:0a.0", "ens10")
    lab.add_nic("0000:00:0b.0", "ens11")
    lab.kubelet.start()
    lab.start(metrics=True)
    lab.kubelet.wait_registered(RES)
    lab.kubelet.allocate(RES, 1)
    lab.cable("ens11", False)
    lab.kubelet.wait_health(RES, {"0000:00:0a.0": "Healthy", "0000:00:0b.0": "Unhealthy"})
    _wait_ready(lab)
    status, text = lab.http("/metrics")
    assert status == 200
    assert f'virtdp_devices{{health="Healthy",resource="{RES}"}} 1.0' in text
    assert f'virtdp_devices{{health="Unhealthy",resource="{RES}"}} 1.0' in text
    assert f'virtdp_allocations_total{{resource="{RES}",result="ok"}} 1.0' in text
    assert f'virtdp_registrations_total{{resource="{RES}",result="ok"}} 1.0' in text
    assert f'virtdp_allocate_duration_seconds_count{{resource="{RES}"}} 1.0' in text
    assert "virtdp_kubelet_restarts_total 0.0" in text
    sent = [ln for ln in text.splitlines() if ln.startswith("virtdp_list_and_watch_updates_total")]
    assert sent and float(sent[0].split()[-1]) >= 2
    assert lab.http("/nope")[0] == 404


def _wait_ready(lab, timeout=5.0):
    deadline = time.monotonic() + timeout
    while _http_when_up(lab, "/readyz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.05)


def _http_when_up(lab, path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return lab.http(path)
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
