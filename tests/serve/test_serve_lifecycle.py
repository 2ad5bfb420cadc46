"""Kubelet restarts, config reloads, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import time

import pytest

RES = "kernel.org/virt"
A, B, C = "0000:00:0a.0", "0000:00:0b.0", "0000:00:0c.0"


def test_kubelet_restart_reregisters_within_a_second(lab):
    lab.add_nic(A, "ens10")
    lab.kubelet.start()
    lab.start(metrics=True)
    lab.kubelet.wait_registered(RES)
    checkpoint = lab.plugin_dir / "kubelet_internal_checkpoint"
    assert checkpoint.exists()

    for i in range(3):
        restarted = lab.kubelet.restart()
        # Like the real kubelet (readCheckpoint): the resource waits as a stopped endpoint.
        assert lab.kubelet.endpoints[RES].stop_time is not None or lab.kubelet.active(RES)
        lab.kubelet.wait_registered(RES, timeout=5)
        took = lab.kubelet.endpoints[RES].registered_at - restarted
        assert took < 1.0, f"re-registered {took:.2f}s after restart {i}"
        assert lab.kubelet.health(RES) == {A: "Healthy"}
    assert checkpoint.exists()
    assert lab.log().count("is gone; serving again") == 3
    assert "virtdp_kubelet_restarts_total 3.0" in lab.http("/metrics")[1]
    # Still fully working after the restarts.
    ids, resp = lab.kubelet.allocate(RES, 1)
    assert ids == [A]


def test_socket_deleted_alone_is_served_again(lab):
    lab.add_nic(A, "ens10")
    lab.kubelet.start()
    lab.start()
    lab.kubelet.wait_registered(RES)
    n = len(lab.kubelet.registrations)
    os.unlink(lab.socket_path(RES))
    lab.kubelet.wait(lambda: len(lab.kubelet.registrations) > n, 3, "a new Register")
    lab.kubelet.wait_registered(RES)
    assert lab.socket_path(RES).exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_removes_sockets_and_devinfo(lab, sig):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    lab.write_config("""
pools:
  - resourceName: kernel.org/virt
    selectors: {pciAddresses: ["0000:00:0a.0"]}
  - resourceName: kernel.org/other
""")
    lab.kubelet.start()
    lab.start(config=True)
    lab.kubelet.wait_registered(RES)
    lab.kubelet.wait_registered("kernel.org/other")
    lab.kubelet.allocate(RES, 1)
    lab.kubelet.allocate("kernel.org/other", 1)
    foreign = lab.devinfo_dir / "example.com-x-0000:00:1f.0-device.json"
    foreign.write_text("{}")  # someone else's file stays
    assert len(list(lab.devinfo_dir.iterdir())) == 3

    rc, out = lab.signal(sig)
    assert rc == 0
    assert out == "", "stdout carries no logs"
    assert sorted(p.name for p in lab.plugin_dir.iterdir()) == [
        "kubelet.sock",
        "kubelet_internal_checkpoint",
    ]
    assert [p.name for p in lab.devinfo_dir.iterdir()] == [foreign.name]
    # The kubelet saw the stream end: the endpoint is stopped, devices unhealthy.
    lab.kubelet.wait(lambda: lab.kubelet.endpoints[RES].stop_time is not None, 5, "stop")


def _register_count(lab, res):
    return sum(1 for _, r in lab.kubelet.registrations if r.resource_name == res)


def test_config_reload_on_change(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    lab.add_nic(C, "ens12")
    lab.write_config("""
pools:
  - resourceName: example.com/keep
    selectors: {pciAddresses: ["0000:00:0a.0"]}
  - resourceName: example.com/change
    selectors: {pciAddresses: ["0000:00:0b.0"]}
  - resourceName: example.com/drop
    selectors: {pciAddresses: ["0000:00:0c.0"]}
""")
    lab.kubelet.start()
    lab.start(config=True)
    for res in ("example.com/keep", "example.com/change", "example.com/drop"):
        lab.kubelet.wait_registered(res)
    lab.kubelet.allocate("example.com/drop", 1)
    keep_st = lab.socket_path("example.com/keep").stat()
    keep_updates = lab.kubelet.update_count("example.com/keep")

    lab.write_config("""
pools:
  - resourceName: example.com/keep
    selectors: {pciAddresses: ["0000:00:0a.0"]}
  - resourceName: example.com/change
    selectors: {pciAddresses: ["0000:00:0b.0", "0000:00:0c.0"]}
  - resourceName: example.com/new
""")
    lab.kubelet.wait_registered("example.com/new", timeout=5)
    lab.kubelet.wait_health("example.com/change", {B: "Healthy", C: "Healthy"}, timeout=5)
    assert lab.kubelet.health("example.com/new") == {}
    lab.kubelet.wait(
        lambda: lab.kubelet.endpoints["example.com/drop"].stop_time is not None, 5, "drop stopped"
    )
    assert not lab.socket_path("example.com/drop").exists()
    assert not list(lab.devinfo_dir.glob("example.com-drop-*"))
    # The unchanged pool was not disturbed: same socket, one registration, no new list.
    st = lab.socket_path("example.com/keep").stat()
    assert (st.st_ino, st.st_ctime_ns) == (keep_st.st_ino, keep_st.st_ctime_ns)
    assert _register_count(lab, "example.com/keep") == 1
    assert lab.kubelet.update_count("example.com/keep") == keep_updates
    assert lab.kubelet.active("example.com/keep")
    lab.wait_log("config reload (config file changed) applied")


def test_bad_new_config_is_rejected_and_old_one_stays(lab):
    lab.add_nic(A, "ens10")
    lab.write_config("pools:\n  - resourceName: example.com/a\n")
    lab.kubelet.start()
    lab.start(config=True)
    lab.kubelet.wait_registered("example.com/a")
    lab.write_config("pools:\n  - resourceName: example.com/a\n    selectors: {vendors: [xyz]}\n")
    lab.wait_log("rejected, keeping the running config")
    log = lab.log()
    assert str(lab.config_path) in log and "pools[0].selectors.vendors[0]" in log
    assert "expected" in log
    time.sleep(0.5)
    assert lab.kubelet.active("example.com/a")
    assert lab.socket_path("example.com/a").exists()
    ids, _ = lab.kubelet.allocate("example.com/a", 1)
    assert ids == [A]


def test_sighup_reloads(lab):
    lab.add_nic(A, "ens10")
    lab.write_config("pools:\n  - resourceName: example.com/a\n")
    lab.kubelet.start()
    lab.start(config=True)
    lab.kubelet.wait_registered("example.com/a")
    lab.proc.send_signal(signal.SIGHUP)
    lab.wait_log("config reload (SIGHUP): no change")
    # Written in place, same size and mtime: inotify still reports the write.
    st = lab.config_path.stat()
    lab.config_path.write_text("pools:\n  - resourceName: example.com/b\n")
    os.utime(lab.config_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    lab.kubelet.wait_registered("example.com/b", timeout=5)
    assert lab.kubelet.health("example.com/b") == {A: "Healthy"}
    lab.wait_log("config reload (config file changed) applied")


def test_configmap_update_is_seen_by_inotify(lab):
    """The kubelet updates a mounted ConfigMap by writing a new `..<timestamp>` directory and
    renaming a `..data` symlink over the old one; `pools.yaml` is a symlink through `..data`."""
    lab.add_nic(A, "ens10")
    cm = lab.root / "cm"
    cm.mkdir()

    def publish(version: str, text: str) -> None:
        d = cm / f"..{version}"
        d.mkdir()
        (d / "pools.yaml").write_text(text)
        tmp = cm / "..data_tmp"
        os.symlink(d.name, tmp)
        os.replace(tmp, cm / "..data")  # the atomic swap

    publish("v1", "pools:\n  - resourceName: example.com/a\n")
    os.symlink("..data/pools.yaml", cm / "pools.yaml")
    lab.kubelet.start()
    lab.start("--config", str(cm / "pools.yaml"), metrics=True)
    lab.kubelet.wait_registered("example.com/a")
    publish("v2", "pools:\n  - resourceName: example.com/b\n")
    lab.kubelet.wait_registered("example.com/b", timeout=5)
    assert lab.kubelet.health("example.com/b") == {A: "Healthy"}
    lab.wait_log("config reload (config file changed) applied")
    assert lab.metric('virtdp_rescans_total{reason="config"}') == 1
    assert lab.metric('virtdp_rescans_total{reason="resync"}') == 0
