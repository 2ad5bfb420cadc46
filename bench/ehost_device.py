"""Benchmark: ehost-device against Debian's Go host-device plugin, ADD / CHECK / DEL wall time.

Run by hand, as root:  python3 bench/ehost_device.py [-n 30]

Both plugins get the same setup: a node namespace (the "host") with one veth NIC each, a pod
namespace each, the same static IPAM, cniVersion 1.0.0 (the newest host-device speaks). The
timing loop runs inside the node namespace (`ip netns exec`, as a runtime would run the
plugins on the host) so `ip netns exec` itself is not timed. Runs are interleaved, alternating
which plugin goes first; medians and the ehost-device / host-device ratio are printed.
ehost-device runs as `dist/ehost-device.pex` if that exists (and --source is not given), else
`python -m ehost_device` with the interpreter running this script.
Everything it makes is deleted at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

GO_PLUGIN = "/usr/lib/cni/host-device"
CNI_PATH = "/usr/lib/cni"
VERSION = "1.0.0"


def ehost_command(source: bool = False) -> List[str]:
    pex = ROOT / "dist" / "ehost-device.pex"
    if pex.exists() and not source:
        return [str(pex)]
    return [sys.executable, "-m", "ehost_device"]


def ipam(addr: str) -> Dict:
    return {
        "type": "static",
        "addresses": [{"address": addr, "gateway": "198.51.100.1"}],
        # An explicit gw: host-device 1.1.1 CHECK wants the route exactly as the result lists it.
        "routes": [{"dst": "203.0.113.0/24", "gw": "198.51.100.1"}],
    }


def call(argv: List[str], command: str, conf: Dict, netns: str, env_extra: Dict) -> tuple:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "bench",
        "CNI_NETNS": netns,
        "CNI_IFNAME": "net1",
        "CNI_PATH": CNI_PATH,
        **env_extra,
    }
    t0 = time.perf_counter()
    p = subprocess.run(argv, input=json.dumps(conf), env=env, capture_output=True, text=True)
    dt = (time.perf_counter() - t0) * 1000
    if p.returncode != 0:
        raise SystemExit(f"{argv[0]} {command} failed: {p.stdout} {p.stderr[-500:]}")
    return dt, (json.loads(p.stdout) if p.stdout.strip() else None)


def inner(args: argparse.Namespace) -> None:
    """The timing loop, inside the node namespace."""
    ours = ehost_command(args.source)
    ours_env = {} if ours[0].endswith(".pex") else {"PYTHONPATH": os.environ["BENCH_PYTHONPATH"]}
    # The node policy points ehost-device at the fake tree (never the network config).
    policy = os.path.join(os.path.dirname(os.path.abspath(args.sysfs)), "ehost-device.yaml")
    with open(policy, "w") as f:
        f.write(f"sysfsRoot: {json.dumps(args.sysfs)}\n")
    ours_env["EHOST_DEVICE_POLICY"] = policy
    plugins = {
        "ehost-device": (
            ours,
            {
                "cniVersion": VERSION,
                "name": "bench",
                "type": "ehost-device",
                "deviceID": "0000:00:05.0",
                "ipam": ipam("198.51.100.10/24"),
            },
            args.pod_a,
            ours_env,
        ),
        "host-device": (
            [GO_PLUGIN],
            {
                "cniVersion": VERSION,
                "name": "bench",
                "type": "host-device",
                "device": "ens6",
                "ipam": ipam("198.51.100.11/24"),
            },
            args.pod_b,
            {},
        ),
    }
    times: Dict[str, Dict[str, List[float]]] = {
        p: {"ADD": [], "CHECK": [], "DEL": []} for p in plugins
    }
    order = list(plugins)
    for i in range(args.n + 1):  # round 0 warms caches (PEX unpacking, page cache) and is dropped
        for name in order if i % 2 else reversed(order):
            argv, conf, netns, extra = plugins[name]
            t_add, result = call(argv, "ADD", conf, netns, extra)
            t_check, _ = call(argv, "CHECK", dict(conf, prevResult=result), netns, extra)
            t_del, _ = call(argv, "DEL", dict(conf, prevResult=result), netns, extra)
            if i:
                times[name]["ADD"].append(t_add)
                times[name]["CHECK"].append(t_check)
                times[name]["DEL"].append(t_del)
    med = {p: {c: statistics.median(v) for c, v in cs.items()} for p, cs in times.items()}
    print(f"ehost-device as: {' '.join(ours)}   runs: {args.n} (interleaved)")
    print(f"{'command':8} {'ehost-device ms':>16} {'host-device ms':>15} {'ratio':>7}")
    for c in ("ADD", "CHECK", "DEL"):
        a, b = med["ehost-device"][c], med["host-device"][c]
        print(f"{c:8} {a:16.1f} {b:15.1f} {a / b:7.2f}")
    total_a = sum(med["ehost-device"].values())
    total_b = sum(med["host-device"].values())
    print(f"{'total':8} {total_a:16.1f} {total_b:15.1f} {total_a / total_b:7.2f}")


def outer(args: argparse.Namespace) -> None:
    from fakesysfs import FakeSysfs
    from netlab import Netns, ip, veth

    made: List[Netns] = []
    try:
        node, wire, pod_a, pod_b = (Netns(p) for p in ("bn", "bw", "bpa", "bpb"))
        made += [node, wire, pod_a, pod_b]
        veth(node, "ens5", wire, f"w{secrets.token_hex(3)}")
        veth(node, "ens6", wire, f"w{secrets.token_hex(3)}")
        with tempfile.TemporaryDirectory() as tmp:
            fake = FakeSysfs(Path(tmp) / "sys")
            mac = json.loads(ip("-j", "link", "show", "ens5", ns=node.name).stdout)[0]["address"]
            fake.add_virtio_nic("0000:00:05.0", "ens5", mac=mac)
            env = dict(
                os.environ,
                BENCH_PYTHONPATH=os.pathsep.join(
                    str(ROOT / p) for p in ("libs/virtcore", "tools/ehost-device")
                ),
            )
            subprocess.run(
                ["ip", "netns", "exec", node.name, sys.executable, __file__, "--inner"]
                + ["-n", str(args.n), "--sysfs", str(fake.root)]
                + ["--pod-a", pod_a.path, "--pod-b", pod_b.path]
                + (["--source"] if args.source else []),
                env=env,
                check=True,
            )
    finally:
        for ns in reversed(made):
            ns.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=30, help="interleaved rounds (default 30)")
    ap.add_argument("--source", action="store_true", help="run ehost-device from source")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sysfs", help=argparse.SUPPRESS)
    ap.add_argument("--pod-a", help=argparse.SUPPRESS)
    ap.add_argument("--pod-b", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        inner(args)
    else:
        outer(args)


if __name__ == "__main__":
    main()
