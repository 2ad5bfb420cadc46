"""virtcore.claims: the node-local claim record and the per-NIC status files. Atomic writes,
every kind of damage one clear error, the order in which a pod's NICs come."""

from __future__ import annotations

import json
import os
import stat

import pytest

from virtcore import claims
from virtcore.claims import ClaimedDevice, ClaimRecordError, DeviceStatus, PodRef, PreparedClaim

DRIVER = "virt.kernel.org"
NODE = "node-a"


def _dev(pci: str, request: str = "nic", ifname=None) -> ClaimedDevice:
    return ClaimedDevice(request, NODE, claims.device_name(pci), pci, ifname)


def _claim(uid, ns, name, pods, devices) -> PreparedClaim:
    return PreparedClaim(uid, ns, name, DRIVER, tuple(pods), tuple(devices))


POD_A = PodRef("pod-a-uid", "default", "a")
POD_B = PodRef("pod-b-uid", "prod", "b")


def _two():
    return {
        "uid-1": _claim("uid-1", "default", "web", [POD_A], [_dev("0000:00:04.0", ifname="net7")]),
        "uid-2": _claim(
            "uid-2", "prod", "db", [POD_B, POD_A], [_dev("0000:00:05.0"), _dev("0000:00:06.0")]
        ),
    }


def test_device_name_is_a_dns_label_from_the_pci_address():
    assert claims.device_name("0000:00:04.0") == "pci-0000-00-04-0"
    assert claims.device_name("0000:AF:1F.7") == "pci-0000-af-1f-7"
    assert claims.device_name("00:04.0") == "pci-0000-00-04-0"
    with pytest.raises(ValueError, match="not a PCI address"):
        claims.device_name("eth0")


def test_missing_directory_or_file_is_an_empty_record(tmp_path):
    assert claims.load(str(tmp_path / "nope")) == {}
    assert claims.load(str(tmp_path)) == {}
    assert claims.load_statuses(str(tmp_path)) == []


def test_save_then_load_round_trips_with_mode_and_layout(tmp_path):
    d = str(tmp_path / "dra")
    path = claims.save(d, _two(), driver=DRIVER, node=NODE)
    assert path == os.path.join(d, "claims.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert claims.load(d) == _two()
    doc = json.loads(open(path).read())
    assert (doc["version"], doc["driver"], doc["node"]) == (1, DRIVER, NODE)
    # Stable order on disk: by namespace, name.
    assert [c["name"] for c in doc["claims"]] == ["web", "db"]
    assert doc["claims"][0]["devices"] == [
        {
            "request": "nic",
            "pool": NODE,
            "device": "pci-0000-00-04-0",
            "pciAddress": "0000:00:04.0",
            "interfaceName": "net7",
        }
    ]
    assert doc["claims"][1]["pods"][0] == {"uid": "pod-b-uid", "namespace": "prod", "name": "b"}
    # Nothing but the record is left in the directory (no temp files).
    assert os.listdir(d) == ["claims.json"]


def test_save_accepts_an_iterable_and_an_empty_record(tmp_path):
    d = str(tmp_path)
    claims.save(d, list(_two().values()), driver=DRIVER, node=NODE)
    assert set(claims.load(d)) == {"uid-1", "uid-2"}
    claims.save(d, {}, driver=DRIVER, node=NODE)
    assert claims.load(d) == {}


def test_save_is_atomic_a_failed_write_leaves_the_old_record_and_no_temp(tmp_path, monkeypatch):
    d = str(tmp_path)
    claims.save(d, _two(), driver=DRIVER, node=NODE)
    before = open(os.path.join(d, "claims.json")).read()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="No space"):
        claims.save(d, {}, driver=DRIVER, node=NODE)
    monkeypatch.undo()
    assert open(os.path.join(d, "claims.json")).read() == before
    assert os.listdir(d) == ["claims.json"]


def test_save_replaces_by_rename_a_reader_holding_the_old_file_keeps_it(tmp_path):
    d = str(tmp_path)
    claims.save(d, _two(), driver=DRIVER, node=NODE)
    with open(os.path.join(d, "claims.json")) as old:
        ino = os.fstat(old.fileno()).st_ino
        claims.save(d, {}, driver=DRIVER, node=NODE)
        assert os.stat(os.path.join(d, "claims.json")).st_ino != ino
        assert len(json.loads(old.read())["claims"]) == 2  # never overwritten in place
    assert claims.load(d) == {}


def test_save_refuses_what_load_would_refuse(tmp_path):
    d = str(tmp_path)
    bad = _claim("uid-1", "default", "web", [POD_A], [_dev("0000:00:04.0", ifname="a/b")])
    with pytest.raises(ClaimRecordError, match=r"interfaceName: 'a/b' must not contain '/'"):
        claims.save(d, [bad], driver=DRIVER, node=NODE)
    other = PreparedClaim("uid-1", "default", "web", "gpu.example.com", (POD_A,), ())
    with pytest.raises(ValueError, match="of driver gpu.example.com, not virt.kernel.org"):
        claims.save(d, [other], driver=DRIVER, node=NODE)
    c = _two()["uid-1"]
    with pytest.raises(ValueError, match="given twice"):
        claims.save(d, [c, c], driver=DRIVER, node=NODE)
    assert not os.path.exists(os.path.join(d, "claims.json"))


def _good_doc():
    return {
        "version": 1,
        "driver": DRIVER,
        "node": NODE,
        "claims": [
            {
                "uid": "uid-1",
                "namespace": "default",
                "name": "web",
                "pods": [{"uid": "p1", "namespace": "default", "name": "a"}],
                "devices": [
                    {
                        "request": "nic",
                        "pool": NODE,
                        "device": "pci-0000-00-04-0",
                        "pciAddress": "0000:00:04.0",
                        "interfaceName": None,
                    }
                ],
            }
        ],
    }


def _damage(doc, path, value):
    obj = doc
    for k in path[:-1]:
        obj = obj[k]
    if value is KeyError:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (["version"], 2, "version: 2, expected 1"),
        (["driver"], KeyError, "driver: None, expected a non-empty string"),
        (["node"], "", "node: '', expected a non-empty string"),
        (["claims"], {}, "claims: is dict, expected a list"),
        (["claims", 0], "x", r"claims\[0\]: is str, expected an object"),
        (["claims", 0, "uid"], "a/b", r"claims\[0\].uid: 'a/b', expected a UID"),
        (["claims", 0, "namespace"], 3, r"claims\[0\].namespace: 3, expected a non-empty string"),
        (["claims", 0, "pods"], None, r"claims\[0\].pods: is missing, expected a list"),
        (["claims", 0, "pods", 0, "uid"], "", r"claims\[0\].pods\[0\].uid: ''"),
        (["claims", 0, "devices"], "nic", r"claims\[0\].devices: is str, expected a list"),
        (
            ["claims", 0, "devices", 0, "pciAddress"],
            "eth0",
            r"claims\[0\].devices\[0\].pciAddress: 'eth0', expected a PCI address",
        ),
        (
            ["claims", 0, "devices", 0, "device"],
            "pci-0000-00-05-0",
            r"devices\[0\].device: 'pci-0000-00-05-0' does not name pciAddress 0000:00:04.0",
        ),
        (
            ["claims", 0, "devices", 0, "interfaceName"],
            "averyveryverylongname",
            r"interfaceName: 'averyveryverylongname' is 21 bytes long \(at most 15\)",
        ),
        (["claims", 0, "devices", 0, "request"], KeyError, r"devices\[0\].request: None"),
    ],
)
def test_malformed_record_names_file_key_and_expectation(tmp_path, path, value, expected):
    p = tmp_path / "claims.json"
    p.write_text(json.dumps(_damage(_good_doc(), path, value)))
    with pytest.raises(ClaimRecordError, match=expected) as e:
        claims.load(str(tmp_path))
    assert str(e.value).startswith(str(p) + ": ")


def test_duplicates_in_the_record_are_refused(tmp_path):
    doc = _good_doc()
    doc["claims"].append(doc["claims"][0])
    (tmp_path / "claims.json").write_text(json.dumps(doc))
    with pytest.raises(ClaimRecordError, match=r"claims\[1\].uid: 'uid-1' appears twice"):
        claims.load(str(tmp_path))
    doc = _good_doc()
    doc["claims"][0]["devices"] *= 2
    (tmp_path / "claims.json").write_text(json.dumps(doc))
    with pytest.raises(
        ClaimRecordError, match=r"devices\[1\]: nic/node-a/pci-0000-00-04-0 appears"
    ):
        claims.load(str(tmp_path))


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "is empty, expected a claim record"),
        (
            b'{"version": 1, "claims": [',
            r"not JSON \(.* line 1 column 27\), expected a claim record",
        ),
        (b"\xff\xfe", r"not UTF-8 \(byte 0\)"),
        (b"[1]", "top level is list, expected an object"),
    ],
)
def test_unreadable_record_is_one_clear_error(tmp_path, content, expected):
    (tmp_path / "claims.json").write_bytes(content)
    with pytest.raises(ClaimRecordError, match=expected):
        claims.load(str(tmp_path))


def test_record_that_is_a_directory(tmp_path):
    (tmp_path / "claims.json").mkdir()
    with pytest.raises(ClaimRecordError, match="is a directory, expected a claim record"):
        claims.load(str(tmp_path))


def test_for_pod_orders_by_claim_then_request_then_device():
    record = _two()
    record["uid-3"] = _claim(
        "uid-3",
        "default",
        "alpha",
        [POD_A],
        [_dev("0000:00:09.0", "b"), _dev("0000:00:08.0", "b"), _dev("0000:00:07.0", "a")],
    )
    got = [(c.name, d.request, d.pci_address) for c, d in claims.for_pod(record, "pod-a-uid")]
    assert got == [
        ("alpha", "a", "0000:00:07.0"),
        ("alpha", "b", "0000:00:08.0"),
        ("alpha", "b", "0000:00:09.0"),
        ("web", "nic", "0000:00:04.0"),
        ("db", "nic", "0000:00:05.0"),  # prod/db after default/*
        ("db", "nic", "0000:00:06.0"),
    ]
    assert [d.pci_address for _, d in claims.for_pod(record, "pod-b-uid")] == [
        "0000:00:05.0",
        "0000:00:06.0",
    ]
    assert claims.for_pod(record, "someone-else") == []


def _status(uid="uid-1", pci="0000:00:04.0", **kw) -> DeviceStatus:
    base = dict(
        claim_uid=uid,
        claim_namespace="default",
        claim_name="web",
        driver=DRIVER,
        pool=NODE,
        device=claims.device_name(pci),
        pod_uid="pod-a-uid",
        container_id="c0ffee",
        if_name="net1",
        interface_name="net1",
        ips=("198.51.100.2/24", "2001:db8::2/64"),
        hardware_address="aa:bb:cc:dd:ee:01",
    )
    base.update(kw)
    return DeviceStatus(**base)


def test_status_write_load_remove(tmp_path):
    d = str(tmp_path)
    p1 = claims.write_status(d, _status())
    p2 = claims.write_status(d, _status("uid-2", "0000:00:05.0", ips=()))
    assert p1 == os.path.join(d, "status", "uid-1_pci-0000-00-04-0.json")
    assert stat.S_IMODE(os.stat(p1).st_mode) == 0o644
    doc = json.loads(open(p1).read())
    assert doc["claim"] == {"uid": "uid-1", "namespace": "default", "name": "web"}
    assert doc["podUID"] == "pod-a-uid" and doc["containerID"] == "c0ffee"
    assert doc["networkData"] == {
        "interfaceName": "net1",
        "ips": ["198.51.100.2/24", "2001:db8::2/64"],
        "hardwareAddress": "aa:bb:cc:dd:ee:01",
    }
    assert claims.load_statuses(d) == [_status(), _status("uid-2", "0000:00:05.0", ips=())]
    assert claims.read_status(p2).ips == ()
    # Rewrite replaces.
    claims.write_status(d, _status(interface_name="eth9"))
    assert claims.load_statuses(d)[0].interface_name == "eth9"
    assert claims.remove_status(d, "uid-1", "pci-0000-00-04-0") is True
    assert claims.remove_status(d, "uid-1", "pci-0000-00-04-0") is False  # idempotent
    assert claims.load_statuses(d) == [_status("uid-2", "0000:00:05.0", ips=())]
    assert sorted(os.listdir(os.path.join(d, "status"))) == ["uid-2_pci-0000-00-05-0.json"]


def test_status_key_parses_only_status_file_names():
    assert claims.status_key("uid-1_pci-0000-00-04-0.json") == ("uid-1", "pci-0000-00-04-0")
    assert claims.status_key(".uid-1_pci-0000-00-04-0.json.abc") is None
    assert claims.status_key(".uid-1_pci-0000-00-04-0.json") is None
    assert claims.status_key("uid-1.json") is None
    assert claims.status_key("uid-1_PCI.json") is None


def test_status_refuses_bad_values_before_writing(tmp_path):
    d = str(tmp_path)
    with pytest.raises(
        ClaimRecordError, match=r"networkData.ips\[0\]: '198.51.100.2', expected CIDR"
    ):
        claims.write_status(d, _status(ips=("198.51.100.2",)))
    with pytest.raises(ClaimRecordError, match="networkData.interfaceName: '' is empty"):
        claims.write_status(d, _status(interface_name=""))
    with pytest.raises(ValueError, match="claim UID '../x' is not a UID"):
        claims.write_status(d, _status(uid="../x"))
    with pytest.raises(ValueError, match="is not a DRA device name"):
        claims.remove_status(d, "uid-1", "../claims.json")
    assert not os.path.exists(os.path.join(d, "status")) or not os.listdir(
        os.path.join(d, "status")
    )


def test_malformed_status_files_raise_or_are_collected(tmp_path):
    d = str(tmp_path)
    good = claims.write_status(d, _status())
    sdir = os.path.join(d, "status")
    with open(os.path.join(sdir, "uid-9_pci-0000-00-09-0.json"), "w") as f:
        f.write('{"claim": {}}')
    with open(os.path.join(sdir, "uid-8_pci-0000-00-08-0.json"), "w") as f:
        json.dump(json.loads(open(good).read()), f)  # a copy named for another claim
    with open(os.path.join(sdir, ".tmp-ignored"), "w") as f:
        f.write("junk")
    with pytest.raises(
        ClaimRecordError, match=r"uid-8_pci-0000-00-08-0.json: claim.uid: file is named"
    ):
        claims.load_statuses(d)
    errors: list = []
    assert claims.load_statuses(d, errors=errors) == [_status()]
    assert [os.path.basename(e.source) for e in errors] == [
        "uid-8_pci-0000-00-08-0.json",
        "uid-9_pci-0000-00-09-0.json",
    ]
    assert "device: None, expected a non-empty string" in str(errors[1])


def test_ifname_problem():
    assert claims.ifname_problem("net1") is None
    assert claims.ifname_problem("x" * 15) is None
    assert claims.ifname_problem("x" * 16) == "is 16 bytes long (at most 15)"
    assert claims.ifname_problem("a b") == "must not contain '/', ':' or whitespace"
    assert claims.ifname_problem("..") == "must not be '.' or '..'"
    assert claims.ifname_problem(7) == "is int, expected a string"
