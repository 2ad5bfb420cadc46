"""The shipped image: its size, and how long its containers take to start under containerd.

    bench/image.py [--runs N]

Builds the image with deployments/build-image on the offline base (tests/runtime/imagelab.py;
the base's root filesystem is cached in /var/cache/virtdp-test), then N times runs the
DaemonSet's pod on a fresh node (own containerd, fake sysfs with one virtio NIC, the test
kubelet) and times, from StartContainer: install-cni until it exited, virtdp-serve until the
test kubelet has it registered and its device listed. Every start is a first start (the pod's
emptyDir, PEX_ROOT, is new), as after a node reboot or a DaemonSet rollout. Needs root,
buildah, debootstrap, containerd and the PEX files in dist/ (./pants package tools/::).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import imagelab

RESOURCE = "kernel.org/virt"
MB = 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="pods started (default 5)")
    args = ap.parse_args()
    root = imagelab.find_repo_root()
    why = imagelab.missing(root)
    if why:
        print(f"bench/image.py: cannot run: {why}", file=sys.stderr)
        return 2
    install: List[float] = []
    serve: List[float] = []
    with tempfile.TemporaryDirectory(prefix="vimg-bench-") as work:
        with imagelab.built_image(root, Path(work)) as image:
            print(
                f"image: {image.size_bytes / MB:.1f} MB uncompressed "
                f"(base {(image.size_bytes - image.own_bytes) / MB:.1f} MB, "
                f"virtdp layers {image.own_bytes / MB:.1f} MB); built in {image.seconds:.1f} s"
            )
            for i in range(args.runs):
                node = imagelab.DaemonSetNode(root, image)
                try:
                    node.start()
                    assert node.kubelet is not None
                    cid = node.create("install-cni")
                    t0 = time.monotonic()
                    node.start_container(cid)
                    st = node.wait_exited(cid, timeout=60)
                    install.append(time.monotonic() - t0)
                    assert st.exit_code == 0, node.log("install-cni")
                    cid = node.create("virtdp-serve")
                    t0 = time.monotonic()
                    node.start_container(cid)
                    node.kubelet.wait_health(RESOURCE, {imagelab.NIC_PCI: "Healthy"}, timeout=120)
                    serve.append(time.monotonic() - t0)
                    node.stop_container(cid)
                    node.wait_exited(cid, timeout=60)
                finally:
                    node.close()
                print(
                    f"run {i + 1}: install-cni {install[-1]:.2f} s, "
                    f"virtdp-serve registered {serve[-1]:.2f} s",
                    flush=True,
                )
    for name, xs in (
        ("install-cni StartContainer -> exited", install),
        ("virtdp-serve StartContainer -> registered", serve),
    ):
        print(
            f"{name}: n={len(xs)} median={statistics.median(xs):.2f} s "
            f"min={min(xs):.2f} s max={max(xs):.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
