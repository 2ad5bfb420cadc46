"""Benchmark: pod sandboxes through containerd's CRI with ehost-device against Debian's Go
host-device as the pod network: RunPodSandbox and StopPodSandbox+RemovePodSandbox wall time.

Run by hand, as root:  python3 bench/cri.py [-n 15] [--source] [--mode in-process|executor]

The containerd suite's node (tests/runtime/crilab.py): a private containerd in a namespace of
its own, a busybox sandbox image, one veth NIC on a fake virtio PCI tree. Both plugins get the
same conflist but for how it names the NIC: ehost-device by `deviceID` (what Multus injects),
host-device by `device` (its name); the same host-local IPAM. Runs are interleaved, alternating
which plugin goes first; each is checked (the NIC in the pod, then home). Medians and the
ehost-device / host-device ratio are printed. ehost-device runs as `dist/ehost-device.pex`
(VIRTDP_PEX_DIR, as bench/run sets it) or from source. Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
for root in ("tests/runtime", "tests", "libs/virtcore", "tools/ehost-device"):
    if str(ROOT / root) not in sys.path:
        sys.path.insert(0, str(ROOT / root))

PLUGINS = ("ehost-device", "host-device")


def prepare(source: bool) -> str:
    """Ready the containerd suite's lab for a benchmark: why it cannot run ("" when it can).
    `source`: ehost-device from source, not a PEX."""
    if os.geteuid() != 0:
        return "needs root"
    if source:
        os.environ.pop("VIRTDP_PEX_DIR", None)
    # From source, containerd runs `python -m ehost_device` with this PYTHONPATH (crilab).
    os.environ.setdefault(
        "PYTHONPATH",
        os.pathsep.join(str(ROOT / r) for r in ("libs/virtcore", "tools/ehost-device")),
    )
    if not (ROOT / "tests/runtime/cri_api_pb2.py").exists():
        subprocess.run([str(ROOT / "build-support/devgen")], check=True)
    import containerd

    return containerd.missing() or ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=15, help="timed runs per plugin (default 15)")
    ap.add_argument("--source", action="store_true", help="ehost-device from source, not a PEX")
    ap.add_argument(
        "--mode",
        choices=("in-process", "executor"),
        default="in-process",
        help="ehost-device does the work itself, or through a warm executor (default in-process)",
    )
    args = ap.parse_args()
    why = prepare(args.source)
    if why:
        print(f"bench/cri.py: {why}", file=sys.stderr)
        return 2
    import crilab

    times: Dict[str, Dict[str, List[float]]] = {p: {"run": [], "stop+remove": []} for p in PLUGINS}
    with tempfile.TemporaryDirectory(prefix="bench-cri-") as tmp:
        lab = crilab.CriLab(Path(tmp), mode=args.mode)
        try:
            nic, _ = lab.nic_pair("0000:00:0a.0", "ens10", "0000:00:0b.0", "ens11")
            lab.start()
            confs = {
                "ehost-device": lab.plugin_conf(deviceID=nic.pci),
                "host-device": lab.plugin_conf(type="host-device", device=nic.name),
            }
            for i in range(args.n + 1):  # run 0 warms up (the PEX's venv, containerd's caches)
                order = PLUGINS if i % 2 == 0 else PLUGINS[::-1]
                for plugin in order:
                    lab.write_conflist(confs[plugin])
                    config = lab.sandbox_config(f"bench-{plugin}-{i}")
                    t0 = time.perf_counter()
                    pod_id = lab.cri.run_pod(config)
                    t1 = time.perf_counter()
                    netns = lab.cri.pod_netns(pod_id)
                    if not lab.has_link("eth0", netns) or lab.has_link(nic.name):
                        raise SystemExit(f"{plugin}: the NIC did not move into the pod")
                    t2 = time.perf_counter()
                    lab.cri.stop_pod(pod_id)
                    lab.cri.remove_pod(pod_id)
                    t3 = time.perf_counter()
                    if not lab.has_link(nic.name):
                        raise SystemExit(f"{plugin}: the NIC did not come home")
                    if i:
                        times[plugin]["run"].append((t1 - t0) * 1000)
                        times[plugin]["stop+remove"].append((t3 - t2) * 1000)
                    lab.sandboxes_run += 1
        finally:
            lab.close()

    print(f"runs: {args.n}   ehost-device mode: {args.mode}")
    print(f"{'':<16}{'ehost-device':>13}{'host-device':>13}{'ratio':>8}   (median ms)")
    for label, key in (("RunPodSandbox", "run"), ("Stop+Remove", "stop+remove")):
        ours = statistics.median(times["ehost-device"][key])
        peer = statistics.median(times["host-device"][key])
        print(f"{label:<16}{ours:>13.1f}{peer:>13.1f}{ours / peer:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
