"""One eligibility rule on a node: virtdp-discover, virtdp-inspect, virtdp-serve and ehost-device's
ADD agree on which NICs may go to a pod (virtcore.discovery.exclusion). Of three NICs, one has an
address the node routes with, one carries an IPv6 default route in routing table 100, and one is
plain: only the plain one is advertised, discovery and inspect name the others with the reason
ADD refuses them for (CNI error 110), and serve follows the node's routes as they change."""

from __future__ import annotations

import json
import subprocess

from netlab import ip, tag
from nodelab import RES, Node
from toolrun import tool_command

ROUTED = "the node routes through its address 198.18.0.2/24"
TABLE_100 = "carries the IPv6 default route"


def _json(argv: list) -> dict:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_discovery_serve_and_add_agree(tmp_path, figures):
    lab = Node(tmp_path, figures, nics=3)
    try:
        routed, table100, plain = sorted(lab.nics)
        name = {pci: nic.host_ifname for pci, nic in lab.nics.items()}
        node = lab.node.name
        ip("addr", "add", "198.18.0.2/24", "dev", name[routed], ns=node)
        ip("-6", "route", "add", "default", "dev", name[table100], "table", "100", ns=node)
        lab.kubelet.start()
        lab.podres.start()
        lab.start_serve()
        lab.kubelet.wait_health(RES, {plain: "Healthy"}, timeout=20)

        # Discovery, reading the node's namespace from outside it (a socket made inside it).
        nics = _json(
            tool_command("virtdp-discover")
            + ["--sysfs-root", str(lab.sysfs.root), "--netns", lab.node.path, "-o", "json"]
        )
        reasons = {n["pci_address"]: n["excluded_reason"] for n in nics}
        assert reasons == {routed: ROUTED, table100: TABLE_100, plain: None}
        assert {n["pci_address"]: n["pool"] for n in nics}[plain] == RES

        # virtdp-inspect devices, run inside the node (the stdlib reader, as serve and ADD).
        doc = _json(
            ["ip", "netns", "exec", node, *tool_command("virtdp-inspect"), "devices"]
            + ["--device-plugin-dir", str(lab.dp_dir), "--pod-resources-socket", lab.pr_socket]
            + ["--sysfs-root", str(lab.sysfs.root), "-o", "json"]
        )
        [plugin] = doc["plugins"]
        assert [d["id"] for d in plugin["devices"]] == [plain]
        assert {e["pci_address"]: e["reason"] for e in doc["excluded"]} == {
            routed: ROUTED,
            table100: TABLE_100,
        }

        # ADD refuses exactly what is not advertised, for the same reason, and takes the rest.
        pod = lab.new_pod()
        for pci, reason in ((routed, ROUTED), (table100, TABLE_100)):
            run = lab.cni(
                "ADD",
                lab.delegate(deviceID=pci),
                container_id=f"ctr{tag(10)}",
                netns_path=pod.netns.path,
                pod=pod,
            )
            assert run.rc != 0 and run.out is not None, run.stderr
            assert run.out["code"] == 110 and reason in run.out["msg"], run.out
        conf, cid = lab.delegate(deviceID=plain), f"ctr{tag(10)}"
        added = lab.cni("ADD", conf, container_id=cid, netns_path=pod.netns.path, pod=pod).ok()
        lab.cni(
            "DEL",
            {**conf, "prevResult": added},
            container_id=cid,
            netns_path=pod.netns.path,
            pod=pod,
        ).ok()
        lab.account()

        # The node's routes change under the running daemon: an address on the plain NIC
        # withdraws it (a route event of its netdev), flushing it brings it back; the table-100
        # default route gone, that NIC joins.
        ip("addr", "add", "198.18.1.2/24", "dev", name[plain], ns=node)
        lab.kubelet.wait_health(RES, {}, timeout=10)
        ip("addr", "flush", "dev", name[plain], "scope", "global", ns=node)
        lab.kubelet.wait_health(RES, {plain: "Healthy"}, timeout=10)
        ip("-6", "route", "del", "default", "dev", name[table100], "table", "100", ns=node)
        lab.kubelet.wait_health(RES, {plain: "Healthy", table100: "Healthy"}, timeout=10)
        lab.account()
        figures.add(scenarios_passed=1)
    finally:
        lab.close()
