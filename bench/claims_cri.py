"""Benchmark: what ehost-device by DRA claim costs a pod, through containerd's CRI: the node's
conflist is the cluster network (ptp + host-local) with ehost-device chained after it, and pods
run with a prepared claim (one NIC taken) and without one (passed through), against the same
conflist without ehost-device (the cluster network alone). RunPodSandbox and
StopPodSandbox+RemovePodSandbox wall time.

Run by hand, as root:  python3 bench/claims_cri.py [-n 15] [--source] [--mode in-process|executor]

The containerd suite's node (tests/runtime/crilab.py), a claim record written the way
virtdp-serve writes it (virtcore.claims). Runs are interleaved, rotating which case goes first;
each is checked (the claimed NIC in the pod and home again; nothing but eth0 otherwise).
Medians and the difference to the cluster network alone are printed. Everything is removed at
the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
for root in ("tests/runtime", "tests", "libs/virtcore", "tools/ehost-device", "."):
    if str(ROOT / root) not in sys.path:
        sys.path.insert(0, str(ROOT / root))

CASES = ("cluster only", "chained, no claim", "chained, 1 claimed NIC")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=15, help="timed runs per case (default 15)")
    ap.add_argument("--source", action="store_true", help="ehost-device from source, not a PEX")
    ap.add_argument("--mode", choices=("in-process", "executor"), default="in-process")
    args = ap.parse_args()
    from bench.cri import prepare

    why = prepare(args.source)
    if why:
        print(f"bench/claims_cri.py: {why}", file=sys.stderr)
        return 2
    import claimlab
    import crilab
    from toolrun import node_policy

    times: Dict[str, Dict[str, List[float]]] = {c: {"run": [], "stop": []} for c in CASES}
    with tempfile.TemporaryDirectory(prefix="bench-claims-") as tmp:
        lab = crilab.CriLab(Path(tmp), mode=args.mode)
        try:
            nic, _ = lab.nic_pair("0000:00:0a.0", "ens10", "0000:00:0b.0", "ens11")
            dra = Path(tmp) / "dra"
            node_policy(lab.policy, str(lab.fake.root), draStateDir=str(dra))
            lab.start()
            cluster: Dict[str, Any] = {
                "type": "ptp",
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(Path(tmp) / "ipam-cluster"),
                    "ranges": [[{"subnet": "192.0.2.0/24"}]],
                },
            }
            ours: Dict[str, Any] = {
                "type": "ehost-device",
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(Path(tmp) / "ipam-claimed"),
                    "ranges": [[{"subnet": "198.51.100.0/24"}]],
                },
            }
            for i in range(args.n + 1):  # run 0 warms up
                order = CASES[i % 3 :] + CASES[: i % 3]
                for case in order:
                    lab.write_chain([cluster] if case == "cluster only" else [cluster, ours])
                    name = f"bench-{i}-{CASES.index(case)}"
                    claimed = case.endswith("claimed NIC")
                    prepared = [claimlab.claim("c", f"uid-{name}", claimlab.device(nic.pci))]
                    claimlab.write(dra, *(prepared if claimed else []))
                    config = lab.sandbox_config(name)
                    t0 = time.perf_counter()
                    pod_id = lab.cri.run_pod(config)
                    t1 = time.perf_counter()
                    netns = lab.cri.pod_netns(pod_id)
                    links = crilab.ctd_run("nsenter", f"--net={netns}", "ip", "-j", "link")
                    names = sorted(x["ifname"] for x in json.loads(links))
                    want = ["eth0", "lo", "net1"] if claimed else ["eth0", "lo"]
                    if names != want or lab.has_link(nic.name) != (not claimed):
                        raise SystemExit(f"{case}: the pod has {names}")
                    t2 = time.perf_counter()
                    lab.cri.stop_pod(pod_id)
                    lab.cri.remove_pod(pod_id)
                    t3 = time.perf_counter()
                    if not lab.home(nic):
                        raise SystemExit(f"{case}: the NIC did not come home")
                    if i:
                        times[case]["run"].append((t1 - t0) * 1000)
                        times[case]["stop"].append((t3 - t2) * 1000)
                    lab.sandboxes_run += 1
        finally:
            lab.close()

    print(f"runs: {args.n}   ehost-device mode: {args.mode}")
    print(f"{'':<26}{'RunPodSandbox':>15}{'Stop+Remove':>13}   (median ms; +ms vs cluster only)")
    base = {k: statistics.median(times["cluster only"][k]) for k in ("run", "stop")}
    for case in CASES:
        run, stop = (statistics.median(times[case][k]) for k in ("run", "stop"))
        extra = (
            ""
            if case == "cluster only"
            else (f"   +{run - base['run']:.1f} / +{stop - base['stop']:.1f}")
        )
        print(f"{case:<26}{run:>15.1f}{stop:>13.1f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
