"""Malformed CNI invocations (tests/corpus/cni/*.json, one case per file) against ehost-device as
shipped: each must fail with its expected CNI error code and a message naming what was wrong,
as a well-formed CNI error on stdout, and leave the node's NIC exactly where and how it was.

A case file holds:
- `description`: what is wrong;
- `env`: CNI_* variables to change (null removes one) over a valid ADD environment;
- `stdin_patch` (a JSON merge patch, RFC 7386, over a valid config naming the real NIC), or
  `stdin_raw` (text sent as is), or `stdin_base64` (bytes);
- `expect`: `code` and a `fragment` that msg or details must contain;
- `names_real_nic`: the invocation names the node's NIC (it is checked untouched either way).

- `absent_after`: paths that must not exist after the call (nothing created).

Placeholders: @PCI@ the real NIC, @E1000@ a non-virtio NIC, @UNBOUND@ a virtio device without
virtio_net, @ABSENT@ an address with nothing there, @SYSFS@, @IPAM_DIR@, @TMP@ a scratch
directory. The node's own NICs, which the node policy must refuse: @UPLINK@ (ens7, the node
namespace's IPv4 default route), @UPLINK6@ (ens8, an IPv6 default route in routing table 100),
@ADDRNIC@ (ens9, an address the node routes with). @OTHER@ (ens10) is an eligible NIC outside
the pool that the policy file @POLICY_POOLS@ allows; @POLICY_BAD@ is a malformed policy file.

DRA claims (the config names no device; the pod, K8S_POD_UID in CNI_ARGS, holds NICs by claim):
the node policy's draStateDir is @DRA@, whose claims.json reserves for pod
c0ffee00-0000-4000-8000-00000000000a @ABSENT@, for ...0b @UPLINK@, for ...0c @E1000@, for ...0d
@OTHER@, and for ...0e both @PCI@ and @OTHER@, each named data0 by its claim. @POLICY_DRA_POOLS@
is @POLICY_POOLS@ with the same draStateDir; @POLICY_CLAIMS_BAD@ names a directory whose
claims.json is not JSON, @POLICY_CLAIMS_DIR@ one whose claims.json is a directory,
@POLICY_DRA_RELATIVE@ gives a relative draStateDir.

Every case runs in both modes (tests/executor.py): in-process, and through a warm executor
serving the corpus node; the answer must be the same.
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
from executor import MODES, Executor, mode_env
from fakesysfs import FakeSysfs
from netlab import Netns, ip, tag, veth
from toolrun import node_policy, tool_command

CASES = sorted((Path(__file__).parent / "cni").glob("*.json"))
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class CorpusNode:
    def __init__(self, tmp: Path) -> None:
        self.node = Netns("vcn")
        self.wire = Netns("vcw")
        self.pod = Netns("vcp")
        dom = f"{random.randint(0x1000, 0xFFFF):04x}"
        self.places = {
            "@PCI@": f"{dom}:00:05.0",
            "@E1000@": f"{dom}:00:06.0",
            "@UNBOUND@": f"{dom}:00:07.0",
            "@ABSENT@": f"{dom}:00:1f.0",
        }
        self.sysfs = FakeSysfs(tmp / "sys")
        veth(self.node, "ens5", self.wire, "wens5")
        self.sysfs.add_virtio_nic(self.places["@PCI@"], "ens5", mac=self.state()["mac"])
        self.sysfs.add_non_virtio_nic(self.places["@E1000@"], "ens6")
        self.sysfs.add_virtio_nic(self.places["@UNBOUND@"], None, driver=None)
        # The node's own NICs: a test namespace's own routes, never the machine's.
        self.places.update({"@UPLINK@": f"{dom}:00:08.0", "@UPLINK6@": f"{dom}:00:09.0"})
        self.places.update({"@ADDRNIC@": f"{dom}:00:0a.0", "@OTHER@": f"{dom}:00:0b.0"})
        own = {"@UPLINK@": "ens7", "@UPLINK6@": "ens8", "@ADDRNIC@": "ens9", "@OTHER@": "ens10"}
        for place, name in own.items():
            veth(self.node, name, self.wire, f"w{name}")
            mac = self.state(name)["mac"]
            self.sysfs.add_virtio_nic(self.places[place], name, mac=mac)
        ip("addr", "add", "192.0.2.2/24", "dev", "ens7", ns=self.node.name)
        ip("route", "add", "default", "via", "192.0.2.1", "dev", "ens7", ns=self.node.name)
        ip("-6", "route", "add", "default", "dev", "ens8", "table", "100", ns=self.node.name)
        ip("addr", "add", "198.18.0.2/24", "dev", "ens9", ns=self.node.name)
        self.ipam_dir = tmp / "ipam"
        self.places["@SYSFS@"] = str(self.sysfs.root)
        self.places["@IPAM_DIR@"] = str(self.ipam_dir)
        self.policy_env = node_policy(tmp / "ehost-device.yaml", str(self.sysfs.root))
        pools = tmp / "pools.yaml"
        pools.write_text(
            "pools:\n"
            "  - resourceName: example.com/other\n"
            f"    selectors: {{pciAddresses: ['{self.places['@OTHER@']}']}}\n"
            "  - resourceName: kernel.org/virt\n"
        )
        self.places["@POLICY_POOLS@"] = str(tmp / "policy-pools.yaml")
        node_policy(
            tmp / "policy-pools.yaml",
            str(self.sysfs.root),
            allowedPools=["kernel.org/virt"],
            poolConfig=str(pools),
        )
        self.places["@POLICY_BAD@"] = str(tmp / "policy-bad.yaml")
        (tmp / "policy-bad.yaml").write_text("sysfsRoot: sys\n")
        self._claims(tmp, pools)
        self.places["@TMP@"] = str(tmp / "scratch")
        (tmp / "scratch").mkdir()

    def _claims(self, tmp: Path, pools: Path) -> None:
        """The DRA claim record and the policies that name it (see the module docstring)."""
        from claimlab import claim, device, write

        dra = tmp / "dra"
        pod = "c0ffee00-0000-4000-8000-0000000000"
        p = self.places
        write(
            dra,
            claim("absent", pod + "0a", device(p["@ABSENT@"])),
            claim("uplink", pod + "0b", device(p["@UPLINK@"])),
            claim("e1000", pod + "0c", device(p["@E1000@"])),
            claim("other", pod + "0d", device(p["@OTHER@"])),
            claim("twin-a", pod + "0e", device(p["@PCI@"], interface_name="data0")),
            claim("twin-b", pod + "0e", device(p["@OTHER@"], interface_name="data0")),
        )
        p["@DRA@"] = str(dra)
        self.policy_env = node_policy(
            tmp / "ehost-device.yaml", str(self.sysfs.root), draStateDir=str(dra)
        )
        p["@POLICY_DRA_POOLS@"] = str(tmp / "policy-dra-pools.yaml")
        node_policy(
            tmp / "policy-dra-pools.yaml",
            str(self.sysfs.root),
            allowedPools=["kernel.org/virt"],
            poolConfig=str(pools),
            draStateDir=str(dra),
        )
        bad, as_dir = tmp / "dra-bad", tmp / "dra-dir"
        bad.mkdir()
        (bad / "claims.json").write_text('{"version": 1, "claims": [')
        (as_dir / "claims.json").mkdir(parents=True)
        for place, name, directory in (
            ("@POLICY_CLAIMS_BAD@", "policy-claims-bad.yaml", str(bad)),
            ("@POLICY_CLAIMS_DIR@", "policy-claims-dir.yaml", str(as_dir)),
            ("@POLICY_DRA_RELATIVE@", "policy-dra-relative.yaml", "var/lib/virtdp/dra"),
        ):
            p[place] = str(tmp / name)
            node_policy(tmp / name, str(self.sysfs.root), draStateDir=directory)

    def state(self, name: str = "ens5") -> Dict[str, Any]:
        link = json.loads(ip("-j", "link", "show", "dev", name, ns=self.node.name).stdout)[0]
        return {
            "name": link["ifname"],
            "mac": link["address"],
            "mtu": link["mtu"],
            "flags": sorted(link["flags"]),
            "alias": link.get("ifalias"),
        }

    def pod_links(self) -> list:
        out = json.loads(ip("-j", "link", "show", ns=self.pod.name).stdout)
        return sorted(link["ifname"] for link in out)

    def leases(self) -> list:
        d = self.ipam_dir / "corpus"
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.name != "lock" and "last_" not in p.name)

    def fill(self, text: str) -> str:
        for k, v in self.places.items():
            text = text.replace(k, v)
        return text

    def close(self) -> None:
        for ns in (self.pod, self.wire, self.node):
            ns.close()


@pytest.fixture(scope="module")
def corpus_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorpusNode]:
    lab = CorpusNode(tmp_path_factory.mktemp("corpus"))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module", params=MODES)
def corpus_executor(
    request: pytest.FixtureRequest,
    corpus_node: CorpusNode,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Executor | None]:
    if request.param == "in-process":
        yield None
        return
    ex = Executor(tmp_path_factory.mktemp("corpus-exec"), corpus_node.node.name)
    try:
        yield ex
    finally:
        assert ex.stop() == 0, ex.log()
    assert len(ex.calls()) >= len(CASES) - 5, f"the executor served too few cases: {ex.log()}"


def test_corpus_is_big_enough():
    assert len(CASES) >= 50, f"only {len(CASES)} CNI cases in tests/corpus/cni"


@pytest.mark.parametrize("case_file", CASES, ids=[p.stem for p in CASES])
def test_bad_cni_invocation(
    case_file: Path, corpus_node: CorpusNode, corpus_executor: Executor | None, figures
):
    case = json.loads(corpus_node.fill(case_file.read_text()))
    assert set(case) <= {
        "description",
        "env",
        "stdin_patch",
        "stdin_raw",
        "stdin_base64",
        "expect",
        "names_real_nic",
        "absent_after",
    }, f"{case_file.name}: unknown keys"
    env = {
        "PATH": PATH,
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": f"corpus{tag(8)}",
        "CNI_NETNS": corpus_node.pod.path,
        "CNI_IFNAME": "net1",
        "CNI_PATH": "/usr/lib/cni",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=corpus",
        **corpus_node.policy_env,
        **mode_env(corpus_executor),
    }
    argv = tool_command("ehost-device")
    if not argv[0].endswith(".pex") and os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    for k, v in case.get("env", {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    base = {
        "cniVersion": "1.0.0",
        "name": "corpus",
        "type": "ehost-device",
        "deviceID": corpus_node.places["@PCI@"],
        "ipam": {
            "type": "host-local",
            "dataDir": corpus_node.places["@IPAM_DIR@"],
            "ranges": [[{"subnet": "203.0.113.0/24"}]],
        },
    }
    if "stdin_raw" in case:
        data = case["stdin_raw"].encode()
    elif "stdin_base64" in case:
        data = base64.b64decode(case["stdin_base64"])
    else:
        data = json.dumps(merge_patch(base, case.get("stdin_patch", {}))).encode()

    nics = ("ens5", "ens7", "ens8", "ens9", "ens10")
    before = [corpus_node.state(n) for n in nics]
    proc = subprocess.run(
        ["ip", "netns", "exec", corpus_node.node.name, *argv],
        env=env,
        input=data,
        capture_output=True,
        timeout=60,
    )
    figures.add(bad_inputs_tried=1)
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, f"{case['description']}: accepted: {stdout}"
    assert "Traceback" not in stderr, stderr
    err = json.loads(stdout)
    assert set(err) == {"cniVersion", "code", "msg", "details"}, err
    assert err["code"] == case["expect"]["code"], f"{case['description']}: {err}"
    fragment = case["expect"]["fragment"]
    assert fragment in err["msg"] + " " + err["details"], f"{fragment!r} not in {err}"

    after = [corpus_node.state(n) for n in nics]
    lost = after != before or corpus_node.pod_links() != ["lo"]
    leaked = corpus_node.leases()
    figures.add(nics_lost=int(lost), leases_leaked=len(leaked))
    assert after == before, f"the NIC changed: {before} -> {after}"
    assert corpus_node.pod_links() == ["lo"]
    assert leaked == []
    for path in case.get("absent_after", []):
        assert not os.path.lexists(path), f"{case['description']}: {path} was created"
