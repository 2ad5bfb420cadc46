"""Bad input to the DRA driver: claims that cannot be prepared get a per-claim error that says
why, while the other claims of the call are prepared; nothing is recorded for a refused claim and
no NIC is taken. Bad flags and a damaged claim record stop the daemon before it serves."""

from __future__ import annotations

import pytest
from conftest import DRIVER, NODE

from virtcore import claims
from virtcore.kubelet import dra_pb2, dra_pb2_grpc

A, B, C = "0000:00:0a.0", "0000:00:0b.0", "0000:00:0c.0"
POD = "pod-uid-1"


@pytest.fixture
def dra(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    return lab


def _serve(lab, *extra):
    lab.start(*lab.dra_args("dra", *extra))
    lab.dra_kubelet.start()
    plugin = lab.dra_kubelet.wait_registered(DRIVER)
    return dra_pb2_grpc.DRAPluginStub(plugin.channel)


def _prepare(stub, *refs):
    req = dra_pb2.NodePrepareResourcesRequest(
        claims=[dra_pb2.Claim(namespace=ns, uid=uid, name=name) for ns, name, uid in refs]
    )
    return stub.NodePrepareResources(req, timeout=30)


def _ref(claim):
    m = claim["metadata"]
    return m["namespace"], m["name"], m["uid"]


def _opaque(params, requests=(), driver=DRIVER):
    entry = {"source": "FromClaim", "opaque": {"driver": driver, "parameters": params}}
    if requests:
        entry["requests"] = list(requests)
    return entry


@pytest.mark.parametrize(
    "make, expected",
    [
        (
            lambda lab: lab.claim("c", [A], node="node-b", pool="node-b"),
            "ResourceClaim default/c: is allocated to node node-b, not to node-a",
        ),
        (
            lambda lab: lab.claim("c", [A], pool="node-b"),
            "ResourceClaim default/c: device pci-0000-00-0a-0 is in pool node-b, expected pool "
            "node-a (this node: the claim is allocated to another node)",
        ),
        (
            lambda lab: lab.claim("c", [A], driver="gpu.example.com"),
            "ResourceClaim default/c: is allocated devices of driver gpu.example.com, none of "
            "driver virt.kernel.org",
        ),
        (
            lambda lab: lab.claim("c", allocated=False),
            "ResourceClaim default/c: is not allocated (no status.allocation), expected allocated",
        ),
        (
            lambda lab: lab.claim("c", [C]),
            "ResourceClaim default/c: device pci-0000-00-0c-0 is not a NIC this driver offers "
            "on node node-a now (gone, not eligible, or in a device-plugin pool)",
        ),
        (
            lambda lab: lab.claim("c", [A], config=[_opaque({"interfaceName": "a/b"})]),
            "ResourceClaim default/c: opaque config 0 (FromClaim): interfaceName 'a/b' must not "
            "contain '/', ':' or whitespace; expected a Linux interface name such as net1",
        ),
        (
            lambda lab: lab.claim("c", [A], config=[_opaque({"interfaceName": "x" * 16})]),
            "interfaceName 'xxxxxxxxxxxxxxxx' is 16 bytes long (at most 15)",
        ),
        (
            lambda lab: lab.claim("c", [A], config=[_opaque({"ifname": "net1"})]),
            "ResourceClaim default/c: opaque config 0 (FromClaim): unknown parameter ifname; "
            "expected only interfaceName",
        ),
        (
            lambda lab: lab.claim("c", [A], config=[_opaque(["net1"])]),
            "opaque config 0 (FromClaim): parameters is list, expected an object such as "
            '{"interfaceName": "net1"}',
        ),
        (
            lambda lab: lab.claim("c", [A, B], config=[_opaque({"interfaceName": "net1"})]),
            "ResourceClaim default/c: interfaceName net1 applies to 2 NICs: pci-0000-00-0a-0 "
            "(request nic), pci-0000-00-0b-0 (request nic); expected one NIC per interfaceName",
        ),
    ],
    ids=[
        "other-node",
        "other-pool",
        "other-driver",
        "not-allocated",
        "nic-not-here",
        "ifname-slash",
        "ifname-long",
        "unknown-param",
        "params-not-object",
        "ifname-twice",
    ],
)
def test_claim_refused_with_a_clear_error_others_prepared(dra, make, expected):
    stub = _serve(dra)
    bad = make(dra)
    good = dra.claim("good", [B])
    before = dra.record()
    resp = _prepare(stub, _ref(bad), _ref(good))
    bad_uid, good_uid = bad["metadata"]["uid"], good["metadata"]["uid"]
    assert set(resp.claims) == {bad_uid, good_uid}
    assert expected in resp.claims[bad_uid].error
    assert not resp.claims[bad_uid].devices
    assert resp.claims[good_uid].error == ""
    assert set(dra.record()) == set(before) | {good_uid}
    dra.wait_log("DRA: cannot prepare: ")


def test_uid_mismatch_and_unknown_claim(dra):
    stub = _serve(dra)
    claim = dra.claim("c1", [A])
    ns, name, uid = _ref(claim)
    resp = _prepare(stub, (ns, name, "0b7d1a2e-0000-4000-8000-000000000001"))
    assert resp.claims["0b7d1a2e-0000-4000-8000-000000000001"].error == (
        f"ResourceClaim default/c1: has uid {uid}, the kubelet asked for uid "
        "0b7d1a2e-0000-4000-8000-000000000001 (deleted and created again?)"
    )
    resp = _prepare(stub, ("default", "nope", "0b7d1a2e-0000-4000-8000-000000000002"))
    assert resp.claims["0b7d1a2e-0000-4000-8000-000000000002"].error == (
        "ResourceClaim default/nope: not found in the API server (deleted?)"
    )
    assert dra.record() == {}


def test_a_nic_held_by_another_claim_is_refused(dra):
    stub = _serve(dra)
    first = dra.claim("first", [A])
    second = dra.claim("second", [A], pods=[("pod-uid-2", "other")])
    assert _prepare(stub, _ref(first)).claims[first["metadata"]["uid"]].error == ""
    err = _prepare(stub, _ref(second)).claims[second["metadata"]["uid"]].error
    assert err.startswith(
        "ResourceClaim default/second: NIC 0000:00:0a.0 is held by prepared claim default/first"
    )
    assert list(dra.record()) == [first["metadata"]["uid"]]


def test_api_unreachable_is_a_per_claim_error_and_recorded_claims_still_answer(dra):
    stub = _serve(dra)
    done = dra.claim("done", [A])
    fresh = dra.claim("fresh", [B])
    assert _prepare(stub, _ref(done)).claims[done["metadata"]["uid"]].error == ""
    dra.api.down()
    resp = _prepare(stub, _ref(done), _ref(fresh))
    # Prepared before: answered from the record without the API.
    assert resp.claims[done["metadata"]["uid"]].error == ""
    assert [d.device_name for d in resp.claims[done["metadata"]["uid"]].devices] == [
        claims.device_name(A)
    ]
    err = resp.claims[fresh["metadata"]["uid"]].error
    assert (
        err == "ResourceClaim default/fresh: API server unreachable: [Errno 111] Connection refused"
    )
    assert list(dra.record()) == [done["metadata"]["uid"]]
    dra.api.up()
    assert _prepare(stub, _ref(fresh)).claims[fresh["metadata"]["uid"]].error == ""


def test_api_slow_meets_the_deadline(dra):
    stub = _serve(dra, "--dra-api-timeout", "1")
    c1, c2 = dra.claim("c1", [A]), dra.claim("c2", [B])
    dra.api.slow = 3.0
    resp = _prepare(stub, _ref(c1), _ref(c2))
    for c in (c1, c2):
        assert resp.claims[c["metadata"]["uid"]].error == (
            f"ResourceClaim default/{c['metadata']['name']}: the API server did not answer "
            "within the 1s deadline (--dra-api-timeout)"
        )
    assert dra.record() == {}


def test_a_request_without_uid_fails_the_call(dra):
    stub = _serve(dra)
    import grpc

    with pytest.raises(grpc.RpcError) as e:
        _prepare(stub, ("default", "c1", ""))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "claims[0]: uid, namespace and name are required" in e.value.details()


def test_record_unwritable_fails_the_call_and_changes_nothing(dra):
    stub = _serve(dra)
    claim = dra.claim("c1", [A])
    import grpc

    # Tests run as root, which file modes do not stop: a directory where the record goes.
    (dra.dra_state_dir / "claims.json").mkdir(parents=True)
    with pytest.raises(grpc.RpcError) as e:
        _prepare(stub, _ref(claim))
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "cannot write the claim record" in e.value.details()
    assert "nothing was changed" in e.value.details()
    assert [p.name for p in dra.dra_state_dir.iterdir() if p.name.startswith(".")] == []


def test_pod_with_claims_of_two_drivers_touches_nothing(dra):
    """The kubelet looks every driver up before calling any: an unregistered one fails the pod
    with nothing prepared anywhere."""
    from testkubeletdra import DraError

    _serve(dra)
    ours = dra.claim("ours", [A])
    theirs = dra.claim("theirs", [B], driver="gpu.example.com")
    with pytest.raises(DraError, match="DRA driver gpu.example.com is not registered"):
        dra.dra_kubelet.prepare(POD, [ours, theirs])
    assert dra.dra_kubelet.calls == []
    assert dra.record() == {}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--mode", "dra"], "--node-name: missing (and $NODE_NAME is unset)"),
        (["--mode", "dra", "--node-name", "Node_A"], "--node-name 'Node_A': expected a node name"),
        (
            ["--mode", "dra", "--node-name", NODE, "--dra-driver", "Virt"],
            "--dra-driver 'Virt': expected a lower-case DNS subdomain",
        ),
        (["--mode", "both", "--node-name", NODE], "--mode both: --dra-pools is missing"),
        (
            ["--mode", "both", "--node-name", NODE, "--dra-pools", "kernel.org/nope"],
            "--dra-pools kernel.org/nope: no such pool in <embedded default>; expected one of "
            "kernel.org/virt",
        ),
        (["--dra-pools", "kernel.org/virt"], "--dra-pools: only with --mode both"),
        (
            ["--mode", "dra", "--node-name", NODE, "--kubeconfig", "/nonexistent/kc"],
            "API server: kubeconfig /nonexistent/kc: no such file",
        ),
        (
            ["--mode", "dra", "--node-name", NODE, "--dra-api-timeout", "99"],
            "--dra-api-timeout 99: expected seconds between 0.1 and 40",
        ),
    ],
    ids=[
        "no-node",
        "bad-node",
        "bad-driver",
        "both-no-pools",
        "unknown-pool",
        "pools-wrong-mode",
        "no-kubeconfig",
        "timeout",
    ],
)
def test_bad_flags_exit_2_before_serving(lab, args, expected):
    lab.add_nic(A, "ens10")
    proc = lab.run(*args, "--kubelet-registry-dir", str(lab.registry_dir))
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert proc.stdout == ""
    assert not lab.registry_dir.exists()


def test_damaged_claim_record_stops_the_start_and_is_kept(lab):
    lab.add_nic(A, "ens10")
    lab.dra_state_dir.mkdir()
    record = lab.dra_state_dir / "claims.json"
    record.write_text('{"version": 1, "driver": "virt.kernel.org", "claims": [')
    proc = lab.run(*lab.dra_args())
    assert proc.returncode == 2, proc.stderr
    assert f"DRA claim record: {record}: not JSON" in proc.stderr
    assert "it is left as it is (its claims may be in use)" in proc.stderr
    assert record.read_text() == '{"version": 1, "driver": "virt.kernel.org", "claims": ['
    assert not lab.registration_socket.exists() and not lab.dra_socket.exists()
