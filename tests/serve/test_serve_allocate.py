"""Allocate and GetPreferredAllocation as the kubelet calls them, and every malformed request."""

from __future__ import annotations

import json
import os
import stat

import grpc
import pytest
from testkubelet import AllocationFailed

from virtcore import devinfo
from virtcore.kubelet import deviceplugin_pb2 as pb

RES = "kernel.org/virt"
A, B, C, D = "0000:00:0a.0", "0000:00:0b.0", "0000:00:0c.0", "0000:00:0d.0"


def _start(lab, config=None, *, metrics=False):
    lab.add_nic(A, "ens10", numa_node=0)
    lab.add_nic(B, "ens11", numa_node=1)
    lab.add_nic(C, "ens12", numa_node=1)
    lab.add_nic(D, "ens13", numa_node=0)
    if config:
        lab.write_config(config)
    lab.kubelet.start()
    lab.start(config=bool(config), metrics=metrics)
    lab.kubelet.wait_registered(RES)
    mine = [A, B, C] if config else [A, B, C, D]
    lab.kubelet.wait_health(RES, {d: "Healthy" for d in mine})


def test_allocate_env_and_devinfo(lab):
    _start(lab)
    ids, resp = lab.kubelet.allocate(RES, 2, owner="pod1/c1")
    assert len(ids) == 2 and len(set(ids)) == 2
    # Preferred: both on one NUMA node.
    numa = {A: 0, B: 1, C: 1, D: 0}
    assert numa[ids[0]] == numa[ids[1]]
    assert dict(resp.envs) == {"PCIDEVICE_KERNEL_ORG_VIRT": ",".join(sorted(ids))}
    for dev in ids:
        path = lab.devinfo_dir / f"kernel.org-virt-{dev}-device.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
        assert json.loads(path.read_text()) == {
            "type": "pci",
            "version": "1.1.0",
            "pci": {"pci-address": dev},
        }
        assert devinfo.load(str(lab.devinfo_dir), RES, dev) == devinfo.DeviceInfo(dev)
    # The remaining two, then nothing left.
    more, _ = lab.kubelet.allocate(RES, 2, owner="pod2/c1")
    assert sorted(ids + more) == [A, B, C, D]
    with pytest.raises(AllocationFailed):
        lab.kubelet.allocate(RES, 1)


def test_allocate_several_containers_one_call(lab):
    _start(lab)
    resp = lab.kubelet.raw_allocate(RES, [[B, A], [C]])
    assert [dict(r.envs) for r in resp.container_responses] == [
        {"PCIDEVICE_KERNEL_ORG_VIRT": f"{A},{B}"},
        {"PCIDEVICE_KERNEL_ORG_VIRT": C},
    ]


def test_preferred_allocation(lab):
    _start(lab)
    pref = lab.kubelet.preferred
    # must-include first, then its NUMA node.
    assert list(pref(RES, [A, B, C, D], [B], 2).container_responses[0].deviceIDs) == [B, C]
    assert list(pref(RES, [A, B, C, D], [A], 2).container_responses[0].deviceIDs) == [A, D]
    # One node can hold 2: never split them; exactly the size asked.
    got = list(pref(RES, [A, B, C, D], [], 2).container_responses[0].deviceIDs)
    assert got in ([A, D], [B, C])
    assert len(pref(RES, [A, B, C, D], [], 3).container_responses[0].deviceIDs) == 3
    assert sorted(pref(RES, [A, B, C, D], [], 4).container_responses[0].deviceIDs) == [A, B, C, D]
    assert list(pref(RES, [A, B, C], [], 2).container_responses[0].deviceIDs) == [B, C]


def _code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_bad_allocate_requests_are_refused_and_serving_goes_on(lab):
    _start(
        lab,
        """
pools:
  - resourceName: kernel.org/virt
    selectors: {pciAddresses: ["0000:00:0a.0", "0000:00:0b.0", "0000:00:0c.0"]}
  - resourceName: kernel.org/other
""",
        metrics=True,
    )
    lab.kubelet.wait_registered("kernel.org/other")
    k = lab.kubelet
    code, msg = _code(lambda: k.raw_allocate(RES, []))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no container_requests" in msg
    code, msg = _code(lambda: k.raw_allocate(RES, [[]]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "devices_ids is empty" in msg
    code, msg = _code(lambda: k.raw_allocate(RES, [["0000:00:1f.0"]]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown device ID '0000:00:1f.0'" in msg
    code, msg = _code(lambda: k.raw_allocate(RES, [["bogus"]]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'bogus'" in msg
    code, msg = _code(lambda: k.raw_allocate(RES, [[D]]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert D in msg and "belongs to resource kernel.org/other" in msg
    code, msg = _code(lambda: k.raw_allocate(RES, [[A, A]]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "listed twice" in msg

    lab.cable("ens11", False)
    k.wait_health(RES, {A: "Healthy", B: "Unhealthy", C: "Healthy"})
    code, msg = _code(lambda: k.raw_allocate(RES, [[A], [B]]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and B in msg and "Unhealthy" in msg
    # Nothing was written for a refused request.
    assert not devinfo.list_files(str(lab.devinfo_dir))

    req = pb.ContainerPreferredAllocationRequest
    code, msg = _code(lambda: k.raw_preferred(RES, []))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no container_requests" in msg
    code, msg = _code(lambda: k.preferred(RES, [A, C], [], 3))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "larger than the 2 available" in msg
    code, msg = _code(lambda: k.preferred(RES, [A, C], [], 0))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "allocation_size is 0" in msg
    code, msg = _code(lambda: k.preferred(RES, [A], [C], 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not in available_deviceIDs" in msg
    code, msg = _code(lambda: k.preferred(RES, [A, C], [A, C], 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most allocation_size" in msg
    # IDs that are not this pool's (a stale list at the kubelet) are ignored, never an error:
    # the real kubelet fails the pod's admission on any error from this call.
    resp = k.preferred(RES, [A, "0000:00:1f.0"], [], 1)
    assert list(resp.container_responses[0].deviceIDs) == [A]
    resp = k.raw_preferred(RES, [req(available_deviceIDs=[A, D], allocation_size=1)])
    assert list(resp.container_responses[0].deviceIDs) == [A]
    # Fewer usable IDs than asked: every usable one (the kubelet fills or fails on its side).
    resp = k.preferred(RES, [C, "0000:00:1f.0", "bogus"], ["bogus"], 2)
    assert list(resp.container_responses[0].deviceIDs) == [C]
    assert (
        lab.metric('virtdp_preferred_allocation_ignored_ids_total{resource="kernel.org/virt"}') == 4
    )
    lab.wait_log("ignored 0000:00:1f.0, bogus (not devices of this pool now)")

    # Still serving: a good request works, the stream is alive.
    resp = k.raw_allocate(RES, [[C]])
    assert dict(resp.container_responses[0].envs) == {"PCIDEVICE_KERNEL_ORG_VIRT": C}
    assert k.active(RES)
    assert os.path.exists(lab.devinfo_dir / f"kernel.org-virt-{C}-device.json")
    assert lab.proc.poll() is None
