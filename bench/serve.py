"""virtdp-serve benchmarks, by hand (root): `build-support/devtest` env, then

    PYTHONPATH=... .venv/bin/python bench/serve.py [--flaps 100] [--restarts 20] [--nics 256]
        [--idle-sizes 8,256,1024] [--idle-seconds 62]

Runs the daemon as shipped inside a fresh network namespace against the test kubelet and
prints p50/p99 of: carrier loss -> Unhealthy seen by the kubelet, kubelet restart -> plugin
registered again, Allocate round trip at the kubelet; the daemon's resident memory with
`--nics` NICs in 4 pools; and, per `--idle-sizes`, the CPU time the daemon uses at rest (after
every pool registered and listed, NICs half admin-up with carrier; by default over 62 s, which
holds one 60 s resync) as a share of one core,
start -> all NICs listed, and hot-plug (a new PCI function and netdev, announced by a real
uevent) -> listed. With DRA (`--only dra-prepare,dra-slices,dra-idle`): NodePrepareResources
round trip per claim (warm: claim read from the test API server, checked, recorded with fsync),
carrier loss / hot-plug -> ResourceSlice updated in the API server and health Unhealthy at the
kubelet, and the at-rest CPU with DRA on (`--mode both`: half the NICs each side) next to
device-plugin-only. Everything it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests", "serve"), os.path.join(HERE, "..", "tests")]

from conftest import DRIVER, NODE, ServeLab  # noqa: E402  (the test bench of tests/serve)

from virtcore import claims  # noqa: E402
from virtcore.kubelet import dra_pb2, dra_pb2_grpc  # noqa: E402

RES = "kernel.org/virt"


def pct(values: List[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1)))))
    return ordered[k]


def report(name: str, values: List[float], target: str = "") -> None:
    ms = [v * 1000 for v in values]
    print(
        f"{name:<44} n={len(ms):<4} p50={pct(ms, 50):7.1f} ms  p99={pct(ms, 99):7.1f} ms  "
        f"max={max(ms):7.1f} ms  mean={statistics.mean(ms):6.1f} ms {target}"
    )


def _flap(lab: ServeLab, plugged: bool) -> float:
    t0 = time.monotonic()
    lab.cable("ens10", plugged)
    want = "Healthy" if plugged else "Unhealthy"
    lab.kubelet.wait_health(RES, {"0000:00:0a.0": want}, timeout=5)
    return time.monotonic() - t0


def bench_flaps(flaps: int) -> None:
    lab = ServeLab()
    try:
        lab.add_nic("0000:00:0a.0", "ens10")
        lab.kubelet.start()
        lab.start()
        lab.kubelet.wait_registered(RES)
        lab.kubelet.wait_health(RES, {"0000:00:0a.0": "Healthy"})
        down: List[float] = []
        up: List[float] = []
        # Back to back: the case where the kernel announces carrier loss late (linkwatch batching,
        # see virtdp_serve/events.py: these veths share their peer's ifindex, like virtio_net).
        for _ in range(flaps):
            down.append(_flap(lab, False))
            up.append(_flap(lab, True))
        report("carrier loss -> Unhealthy at kubelet", down, "(target p99 < 1500 ms)")
        report("carrier back -> Healthy at kubelet", up)

        times: List[float] = []
        for _ in range(300):
            t0 = time.monotonic()
            lab.kubelet.raw_allocate(RES, [["0000:00:0a.0"]])
            times.append(time.monotonic() - t0)
        report("Allocate round trip (1 device)", times)
    finally:
        lab.close()


def bench_restarts(restarts: int) -> None:
    lab = ServeLab()
    try:
        lab.add_nic("0000:00:0a.0", "ens10")
        lab.kubelet.start()
        lab.start()
        lab.kubelet.wait_registered(RES)
        reg: List[float] = []
        listed: List[float] = []
        for _ in range(restarts):
            n = len(lab.kubelet.registrations)
            t0 = lab.kubelet.restart()
            lab.kubelet.wait(lambda n=n: len(lab.kubelet.registrations) > n, 5, "Register")
            reg.append(lab.kubelet.registrations[n][0] - t0)
            lab.kubelet.wait_registered(RES, timeout=5)
            listed.append(time.monotonic() - t0)
            time.sleep(0.2)
        report("kubelet restart -> Register received", reg, "(target < 1 s)")
        report("kubelet restart -> registered and listed", listed)
    finally:
        lab.close()


def bench_memory(nics: int) -> None:
    lab = ServeLab()
    try:
        batch = []
        addrs = []
        for i in range(nics):
            bus, dev = divmod(i, 32)
            addr = f"0000:{bus + 1:02x}:{dev:02x}.0"
            addrs.append(addr)
            batch.append(
                f"link add t{i} type veth peer name wt{i} netns {lab.wire.name}\n"
                f"link set t{i} up\n"
            )
        subprocess.run(
            ["ip", "-n", lab.node.name, "-batch", "-"], input="".join(batch), text=True, check=True
        )
        subprocess.run(
            ["ip", "-n", lab.wire.name, "-batch", "-"],
            input="".join(f"link set wt{i} up\n" for i in range(nics)),
            text=True,
            check=True,
        )
        for i, addr in enumerate(addrs):
            lab.sysfs.add_virtio_nic(addr, f"t{i}", numa_node=i % 2)
        quarter = nics // 4
        pools = []
        for p in range(4):
            sel = ", ".join(f'"{a}"' for a in addrs[p * quarter : (p + 1) * quarter])
            pools.append(
                f"  - resourceName: example.com/pool{p}\n    selectors: {{pciAddresses: [{sel}]}}\n"
            )
        lab.write_config("pools:\n" + "".join(pools))
        lab.kubelet.start()
        t0 = time.monotonic()
        proc = lab.start(config=True)
        for p in range(4):
            lab.kubelet.wait_registered(f"example.com/pool{p}", timeout=60)
            lab.kubelet.wait(
                lambda p=p: len(lab.kubelet.devices.get(f"example.com/pool{p}", {})) == quarter,
                60,
                "all devices",
            )
        ready = time.monotonic() - t0
        time.sleep(5)  # a few periodic rescans
        rss = hwm = 0
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        print(
            f"{nics} NICs in 4 pools: all listed {ready:.2f}s after start; daemon RSS "
            f"{rss / 1024:.1f} MiB (peak {hwm / 1024:.1f} MiB), CPU {cpu:.2f}s in "
            f"{time.monotonic() - t0:.1f}s"
        )
        t0 = time.monotonic()
        subprocess.run(["ip", "-n", lab.wire.name, "link", "set", "wt1", "down"], check=True)
        lab.kubelet.wait(
            lambda: lab.kubelet.devices["example.com/pool0"][addrs[1]].health == "Unhealthy",
            10,
            "unhealthy",
        )
        print(
            f"  carrier loss -> Unhealthy with {nics} NICs: {(time.monotonic() - t0) * 1000:.1f} ms"
        )
    finally:
        lab.close()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime, stime, and those of waited-for children (a PEX may run helpers).
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _make_nics(lab: ServeLab, first: int, count: int, half_down: bool = True) -> List[str]:
    """`count` veth NICs t<first>.. in the node namespace, every other one admin-down (a spare),
    the admin-up ones with carrier; returns their PCI addresses (fake tree)."""
    idx = range(first, first + count)
    node = "".join(
        f"link add t{i} type veth peer name wt{i} netns {lab.wire.name}\n"
        + ("" if half_down and i % 2 else f"link set t{i} up\n")
        for i in idx
    )
    subprocess.run(["ip", "-n", lab.node.name, "-batch", "-"], input=node, text=True, check=True)
    wire = "".join(f"link set wt{i} up\n" for i in idx)
    subprocess.run(["ip", "-n", lab.wire.name, "-batch", "-"], input=wire, text=True, check=True)
    addrs = []
    for i in idx:
        bus, dev = divmod(i, 32)
        addr = f"0000:{bus + 1:02x}:{dev:02x}.0"
        lab.sysfs.add_virtio_nic(addr, f"t{i}", numa_node=i % 2)
        addrs.append(addr)
    return addrs


def _at_rest(pid: int, seconds: float) -> Tuple[float, float, float, float, float]:
    """After 2 s to settle (start-up work is not "at rest"): the CPU share of one core the
    process used over `seconds`, with the CPU seconds and monotonic times at both ends."""
    time.sleep(2.0)
    c0, w0 = _cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    c1, w1 = _cpu_seconds(pid), time.monotonic()
    return (c1 - c0) / (w1 - w0) * 100, c0, c1, w0, w1


def _add_veth(lab: ServeLab, i: int) -> None:
    """Veth t<i> in the node namespace, its peer wt<i> in the wire namespace (admin down)."""
    subprocess.run(
        ["ip", "-n", lab.node.name, "link", "add", f"t{i}", "type", "veth"]
        + ["peer", "name", f"wt{i}", "netns", lab.wire.name],
        check=True,
    )


def bench_idle(nics: int, seconds: float) -> None:
    """At-rest CPU of the daemon with `nics` NICs in one pool, start -> listed, hot-plug."""
    lab = ServeLab()
    try:
        addrs = _make_nics(lab, 0, nics)
        lab.kubelet.start()
        t0 = time.monotonic()
        proc = lab.start(metrics=True)
        lab.kubelet.wait_registered(RES, timeout=60)
        lab.kubelet.wait(lambda: len(lab.kubelet.devices.get(RES, {})) == nics, 60, "all listed")
        listed = time.monotonic() - t0
        share, c0, c1, w0, w1 = _at_rest(proc.pid, seconds)
        resyncs = lab.metric('virtdp_rescans_total{reason="resync"}')
        print(
            f"idle {nics} NICs: CPU {share:.3f} % of a core over {w1 - w0:.1f}s at rest "
            f"({c1 - c0:.2f}s CPU, {resyncs:.0f} resyncs); start -> {nics} NICs listed "
            f"{listed:.2f}s",
            flush=True,
        )
        # Hot-plug: a new PCI function whose netdev appears, announced by a real uevent.
        hot: List[float] = []
        for k in range(5):
            i = nics + k
            _add_veth(lab, i)
            bus, dev = divmod(i, 32)
            addr = f"0000:{bus + 1:02x}:{dev:02x}.0"
            t1 = time.monotonic()
            lab.sysfs.add_virtio_nic(addr, f"t{i}")
            lab.uevent(f"t{i}", "add")
            while addr not in lab.kubelet.devices.get(RES, {}):
                if time.monotonic() - t1 > 10:
                    break
                time.sleep(0.002)
            hot.append(time.monotonic() - t1)
        print(
            f"hot-plug with {nics} NICs -> listed: max {max(hot) * 1000:.1f} ms "
            f"(n={len(hot)}; 10000 = not listed within 10 s)"
        )
        del addrs
    finally:
        lab.close()


def _dra_start(lab: ServeLab, *flags: str) -> None:
    lab.api.create("nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    lab.dra_kubelet.start()
    lab.start(*lab.dra_args(*flags), metrics=True)
    lab.dra_kubelet.wait_registered(DRIVER, timeout=60)


def bench_dra_prepare(runs: int) -> None:
    """NodePrepareResources of one claim (one NIC), warm: the kubelet's call, timed at the
    kubelet, then NodeUnprepareResources (not timed) so the NIC is free for the next claim."""
    lab = ServeLab()
    try:
        lab.add_nic("0000:00:0a.0", "ens10")
        _dra_start(lab)
        stub = dra_pb2_grpc.DRAPluginStub(lab.dra_kubelet.plugin(DRIVER).channel)
        prep: List[float] = []
        unprep: List[float] = []
        for i in range(runs + 5):
            claim = lab.claim(f"c{i}", ["0000:00:0a.0"])
            ref = dra_pb2.Claim(namespace="default", uid=claim["metadata"]["uid"], name=f"c{i}")
            t0 = time.monotonic()
            resp = stub.NodePrepareResources(
                dra_pb2.NodePrepareResourcesRequest(claims=[ref]), timeout=30
            )
            t1 = time.monotonic()
            assert not resp.claims[ref.uid].error, resp.claims[ref.uid].error
            stub.NodeUnprepareResources(
                dra_pb2.NodeUnprepareResourcesRequest(claims=[ref]), timeout=30
            )
            t2 = time.monotonic()
            if i >= 5:  # the first calls warm the daemon's client and connection
                prep.append(t1 - t0)
                unprep.append(t2 - t1)
        report("NodePrepareResources (1 claim, warm)", prep, "(target p50 < 50 ms)")
        report("NodeUnprepareResources (1 claim)", unprep)
    finally:
        lab.close()


def _slice_taints(lab: ServeLab, device: str) -> Optional[tuple]:
    for s in lab.api.list("resourceslices"):
        for d in s["spec"].get("devices") or []:
            if d["name"] == device:
                return tuple(t["key"] for t in d.get("taints") or [])
    return None


def _until(cond, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return timeout
        time.sleep(0.002)
    return time.monotonic() - t0


def bench_dra_slices(flaps: int) -> None:
    lab = ServeLab()
    try:
        addr = "0000:00:0a.0"
        dev = claims.device_name(addr)
        lab.add_nic(addr, "ens10")
        _dra_start(lab)
        _until(lambda: _slice_taints(lab, dev) == ())
        down: List[float] = []
        up: List[float] = []
        health: List[float] = []
        for _ in range(flaps):
            t0 = time.monotonic()
            lab.cable("ens10", False)
            down.append(_until(lambda: bool(_slice_taints(lab, dev))))
            lab.dra_kubelet.wait_health(DRIVER, NODE, dev, "Unhealthy", timeout=10)
            health.append(time.monotonic() - t0)
            t0 = time.monotonic()
            lab.cable("ens10", True)
            up.append(_until(lambda: _slice_taints(lab, dev) == ()))
            lab.dra_kubelet.wait_health(DRIVER, NODE, dev, "Healthy", timeout=10)
        report("carrier loss -> slice tainted (API server)", down, "(target < 2 s)")
        report("carrier loss -> Unhealthy at kubelet (DRA)", health)
        report("carrier back -> taint removed", up)
        hot: List[float] = []
        for k in range(5):
            i = 20 + k
            a = f"0000:00:{i:02x}.0"
            _add_veth(lab, i)
            lab.sysfs.add_virtio_nic(a, f"t{i}")
            lab.uevent(f"t{i}", "add")
            hot.append(_until(lambda a=a: _slice_taints(lab, claims.device_name(a)) is not None))
        report("hot-plug -> device in the slice", hot, "(target < 2 s)")
    finally:
        lab.close()


def bench_dra_idle(nics: int, seconds: float) -> None:
    """At-rest CPU with DRA on: `--mode both`, half of the NICs in a DRA pool, half in a
    device-plugin pool, against the test kubelet (both sides) and the test API server."""
    lab = ServeLab()
    try:
        addrs = _make_nics(lab, 0, nics)
        half = nics // 2
        sel = lambda xs: ", ".join(f'"{a}"' for a in xs)  # noqa: E731
        lab.write_config(
            "pools:\n"
            f"  - resourceName: {RES}\n    selectors: {{pciAddresses: [{sel(addrs[:half])}]}}\n"
            f"  - resourceName: example.com/dra\n"
            f"    selectors: {{pciAddresses: [{sel(addrs[half:])}]}}\n"
        )
        lab.kubelet.start()
        lab.api.create("nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
        lab.dra_kubelet.start()
        t0 = time.monotonic()
        proc = lab.start(
            *lab.dra_args("both", "--dra-pools", "example.com/dra"), config=True, metrics=True
        )
        lab.kubelet.wait_registered(RES, timeout=60)
        lab.dra_kubelet.wait_registered(DRIVER, timeout=60)
        lab.kubelet.wait(lambda: len(lab.kubelet.devices.get(RES, {})) == half, 60, "listed")

        def published() -> int:
            return sum(len(s["spec"].get("devices") or []) for s in lab.api.list("resourceslices"))

        _until(lambda: published() == nics - half, 60)
        ready = time.monotonic() - t0
        share, c0, c1, w0, w1 = _at_rest(proc.pid, seconds)
        writes = sum(
            float(line.rpartition(" ")[2])
            for line in lab.http("/metrics")[1].splitlines()
            if line.startswith("virtdp_dra_slice_writes_total{")
        )
        print(
            f"idle {nics} NICs, DRA on (--mode both, {nics - half} DRA + {half} device plugin): "
            f"CPU {share:.3f} % of a core over {w1 - w0:.1f}s at rest ({c1 - c0:.2f}s CPU); "
            f"start -> listed and published {ready:.2f}s; {writes:.0f} slice writes in all",
            flush=True,
        )
    finally:
        lab.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flaps", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--nics", type=int, default=256)
    ap.add_argument("--idle-sizes", default="8,256,1024", help="NIC counts for the at-rest run")
    # Over 60 s: the window holds one full resync (--resync-interval 60), so the figure is the
    # real average, safety net included.
    ap.add_argument("--idle-seconds", type=float, default=62.0)
    ap.add_argument("--prepares", type=int, default=200)
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated: flaps,restarts,memory,idle,dra-prepare,dra-slices,dra-idle",
    )
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    if not only or "flaps" in only:
        bench_flaps(args.flaps)
    if not only or "restarts" in only:
        bench_restarts(args.restarts)
    if not only or "memory" in only:
        bench_memory(args.nics)
    if not only or "idle" in only:
        for n in (int(x) for x in args.idle_sizes.split(",") if x):
            bench_idle(n, args.idle_seconds)
    if not only or "dra-prepare" in only:
        bench_dra_prepare(args.prepares)
    if not only or "dra-slices" in only:
        bench_dra_slices(min(args.flaps, 30))
    if not only or "dra-idle" in only:
        bench_dra_idle(args.nics, args.idle_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
