"""The claim status writer: status files that ehost-device writes (virtcore.claims) become the
claim's status.devices[] networkData through the status subresource of the test API server, and
go away with the files; other drivers' entries are kept; conflicts, a vanished or replaced
claim, an unreachable API and a restart are handled."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from conftest import DRIVER, NODE, wait_for
from testapiserver import TestApiServer

from virtcore import claims, kubeapi
from virtdp_serve import claimstatus

DEV0 = "pci-0000-01-00-0"
DEV1 = "pci-0000-01-01-0"
OTHER = {"driver": "gpu.example.com", "pool": NODE, "device": "gpu-0", "data": {"k": "v"}}


def make_claim(
    api: TestApiServer, name: str = "c1", namespace: str = "ns1", devices: tuple = (DEV0, DEV1)
) -> Dict[str, Any]:
    c = api.create(
        "resourceclaims",
        {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "devices": {"requests": [{"name": "nic", "exactly": {"deviceClassName": DRIVER}}]}
            },
        },
    )
    results = [{"request": "nic", "driver": DRIVER, "pool": NODE, "device": d} for d in devices]
    results.append({"request": "nic", "driver": OTHER["driver"], "pool": NODE, "device": "gpu-0"})
    c["status"] = {"allocation": {"devices": {"results": results}}, "devices": [OTHER]}
    return api.update("resourceclaims", c, subresource="status")


def status(
    claim: Dict[str, Any],
    device: str = DEV0,
    ips: tuple = ("198.51.100.2/24",),
    ifname: str = "net1",
) -> claims.DeviceStatus:
    meta = claim["metadata"]
    return claims.DeviceStatus(
        claim_uid=meta["uid"],
        claim_namespace=meta["namespace"],
        claim_name=meta["name"],
        driver=DRIVER,
        pool=NODE,
        device=device,
        pod_uid=str(uuid.uuid4()),
        container_id="c0ffee",
        if_name=ifname,
        interface_name=ifname,
        ips=ips,
        hardware_address="52:54:00:00:00:01",
    )


def entries(api: TestApiServer, name: str = "c1", namespace: str = "ns1") -> List[Dict[str, Any]]:
    c = api.get("resourceclaims", name, namespace) or {}
    return (c.get("status") or {}).get("devices") or []


def ours(api: TestApiServer, name: str = "c1") -> Dict[str, Dict[str, Any]]:
    return {e["device"]: e for e in entries(api, name) if e["driver"] == DRIVER}


@pytest.fixture
def state_dir(tmp_path: Path) -> str:
    return str(tmp_path / "dra")


@pytest.fixture
def writer(kube: kubeapi.Kube, state_dir: str) -> Iterator[claimstatus.StatusWriter]:
    w = claimstatus.StatusWriter(kube, driver=DRIVER, state_dir=state_dir, backoff_max=0.5)
    w.start()
    yield w
    w.stop()


def test_file_written_then_removed(
    api: TestApiServer, writer: claimstatus.StatusWriter, state_dir: str
) -> None:
    c = make_claim(api)
    assert oct(os.stat(claims.status_dir(state_dir)).st_mode & 0o777) == "0o755"
    claims.write_status(state_dir, status(c, ips=("198.51.100.2/24", "2001:DB8::2/64")))
    wait_for(lambda: DEV0 in ours(api), 5, "entry written")
    assert ours(api)[DEV0] == {
        "driver": DRIVER,
        "pool": NODE,
        "device": DEV0,
        "networkData": {
            "interfaceName": "net1",
            "ips": ["198.51.100.2/24", "2001:db8::2/64"],  # canonical, as the API wants
            "hardwareAddress": "52:54:00:00:00:01",
        },
    }
    assert OTHER in entries(api)  # another driver's entry is kept
    claims.write_status(state_dir, status(c, DEV1, ifname="net2"))
    wait_for(lambda: set(ours(api)) == {DEV0, DEV1}, 5, "second entry written")
    claims.remove_status(state_dir, c["metadata"]["uid"], DEV0)  # CNI DEL of net1
    wait_for(lambda: set(ours(api)) == {DEV1}, 5, "entry removed")
    claims.remove_status(state_dir, c["metadata"]["uid"], DEV1)
    wait_for(lambda: ours(api) == {}, 5, "all entries removed")
    assert entries(api) == [OTHER]
    assert api.unknown_fields == []


def test_conflict_is_read_again(
    api: TestApiServer, writer: claimstatus.StatusWriter, state_dir: str
) -> None:
    c = make_claim(api)
    api.conflict_next("resourceclaims", "c1")
    patches = api.count("PATCH", "/resourceclaims/c1/status")
    claims.write_status(state_dir, status(c))
    wait_for(lambda: DEV0 in ours(api), 5, "entry written after the 409")
    assert api.count("PATCH", "/resourceclaims/c1/status") - patches == 2
    assert (api.get("resourceclaims", "c1", "ns1") or {})["metadata"]["labels"]


def test_device_not_allocated_is_not_reported(
    api: TestApiServer, writer: claimstatus.StatusWriter, state_dir: str
) -> None:
    c = make_claim(api, devices=(DEV0,))
    claims.write_status(state_dir, status(c, DEV1))  # not this claim's device
    claims.write_status(state_dir, status(c, DEV0))
    wait_for(lambda: DEV0 in ours(api), 5, "the allocated one written")
    assert set(ours(api)) == {DEV0}
    assert writer.last_error is None  # no 422 from the API: it was never sent


def test_gone_or_replaced_claim_is_left_alone(
    api: TestApiServer, writer: claimstatus.StatusWriter, state_dir: str
) -> None:
    c = make_claim(api)
    api.delete("resourceclaims", "c1", "ns1")
    claims.write_status(state_dir, status(c))
    wait_for(lambda: api.count("GET", "/namespaces/ns1/resourceclaims/c1") >= 1, 5, "read")
    assert writer.wait_idle(5)
    make_claim(api)  # same name, another object
    claims.write_status(state_dir, status(c, DEV1))
    wait_for(lambda: api.count("GET", "/namespaces/ns1/resourceclaims/c1") >= 2, 5, "read")
    assert writer.wait_idle(5)
    assert ours(api) == {} and api.count("PATCH", "/resourceclaims/c1/status") == 0


def test_unreachable_then_back(
    api: TestApiServer, writer: claimstatus.StatusWriter, state_dir: str
) -> None:
    c = make_claim(api)
    api.down()
    claims.write_status(state_dir, status(c))
    wait_for(lambda: writer.last_error, 5, "failure reported")
    assert "unreachable" in (writer.last_error or "")
    api.up()
    wait_for(lambda: DEV0 in ours(api), 10, "written once the API is back")
    wait_for(lambda: writer.last_error is None, 5, "error cleared")


def test_start_reconciles_files_and_prepared_claims(
    api: TestApiServer, kube: kubeapi.Kube, state_dir: str
) -> None:
    c1 = make_claim(api, "c1")
    c2 = make_claim(api, "c2")
    # Written while the daemon was down: c1 has a file; c2's file went (its entry is stale).
    claims.write_status(state_dir, status(c1))
    stale = claimstatus.entry(status(c2))
    c2 = api.get("resourceclaims", "c2", "ns1") or {}
    c2["status"]["devices"] = [OTHER, stale]
    api.update("resourceclaims", c2, subresource="status")
    prepared = [(c2["metadata"]["uid"], "ns1", "c2"), (c1["metadata"]["uid"], "ns1", "c1")]
    w = claimstatus.StatusWriter(
        kube, driver=DRIVER, state_dir=state_dir, prepared=lambda: prepared, backoff_max=0.5
    )
    w.start()
    try:
        wait_for(lambda: DEV0 in ours(api, "c1") and ours(api, "c2") == {}, 5, "reconciled")
        assert entries(api, "c2") == [OTHER]
        patches = api.count("PATCH", "/status")
        w.claim_changed(c1["metadata"]["uid"], "ns1", "c1")  # nothing differs: no write
        wait_for(lambda: api.count("GET", "/resourceclaims/c1") >= 2, 5, "looked again")
        assert w.wait_idle(5) and api.count("PATCH", "/status") == patches
    finally:
        w.stop()


def test_bad_file_is_skipped(
    api: TestApiServer, writer: claimstatus.StatusWriter, state_dir: str
) -> None:
    c = make_claim(api)
    uid = c["metadata"]["uid"]
    bad = os.path.join(claims.status_dir(state_dir), f"{uid}_{DEV1}.json")
    with open(bad, "w") as f:
        f.write('{"claim": "not an object"}')
    claims.write_status(state_dir, status(c, DEV0))
    wait_for(lambda: DEV0 in ours(api), 5, "the good file written")
    assert set(ours(api)) == {DEV0}


def test_directory_recreated(
    api: TestApiServer, writer: claimstatus.StatusWriter, state_dir: str
) -> None:
    c = make_claim(api)
    sdir = claims.status_dir(state_dir)
    os.rmdir(sdir)
    wait_for(lambda: os.path.isdir(sdir), 5, "status directory made again")
    claims.write_status(state_dir, status(c))
    wait_for(lambda: DEV0 in ours(api), 5, "still watched")
