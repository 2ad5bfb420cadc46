"""The API side of DRA, by hand (`build-support/devtest` env, then):

    PYTHONPATH=libs/virtcore:tools/virtdp-serve:tests .venv/bin/python bench/dra_api.py \
        [--runs 50] [--sizes 1,64,256] [--idle-nics 256] [--idle-seconds 62]

Prints:
- the `kubernetes` client's cost: CPU time and peak memory of importing it (as kubeapi.connect
  does) in a fresh interpreter, next to a bare one and the daemon's own modules (which no
  longer load it: only DRA mode does, in connect());
- ResourceSlice publication: Publisher.update() with one NIC changed (a carrier loss: a taint)
  until the test API server holds it (p50/p99), at each size; a change rewrites every slice of
  the pool (a new generation), 64 devices per slice;
- hot-plug: update() with one more NIC until it is in the API server;
- at rest: the CPU time a process running the publisher and the claim status writer for
  `--idle-nics` NICs uses over `--idle-seconds` (the API server in another process, its watch
  open with the real server's one bookmark a minute), as a share of one core.
The daemon-level figures (a real carrier loss through the kernel's events to the slice, DRA on
against device plugin only) are in bench/serve.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests")]

from testapiserver import TestApiServer  # noqa: E402

from virtcore import claims, kubeapi  # noqa: E402
from virtdp_serve import claimstatus, slices  # noqa: E402
from virtdp_serve.inventory import NO_CARRIER, DraDevice  # noqa: E402

NODE = "bench-node"


def pct(values: List[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1)))))]


def report(name: str, values: List[float], target: str = "") -> None:
    ms = [v * 1000 for v in values]
    print(
        f"{name:<48} n={len(ms):<4} p50={pct(ms, 50):7.1f} ms  p99={pct(ms, 99):7.1f} ms  "
        f"max={max(ms):7.1f} ms  mean={statistics.mean(ms):6.1f} ms {target}",
        flush=True,
    )


def nic(i: int, problem: object = None) -> DraDevice:
    address = f"0000:{1 + i // 32:02x}:{i % 32:02x}.0"
    return DraDevice(
        name=claims.device_name(address),
        pci_address=address,
        pool="kernel.org/virt",
        numa_node=0,
        mac=f"52:54:00:00:{i // 256:02x}:{i % 256:02x}",
        ifname=f"ens{i + 4}",
        vendor="0x1af4",
        device_id="0x1041",
        pcie_root="pci0000:00",
        problem=problem if isinstance(problem, str) else None,
    )


# -- the client's cost ------------------------------------------------------------------------
# What the DRA side loads on top of the daemon: kubeapi.connect() and the two API classes.
CLIENT = (
    "import kubernetes.client, kubernetes.config, kubernetes.watch.watch; "
    "from kubernetes.client import ResourceV1Api"
)
MEASURE = (
    "import time, resource; t = time.process_time(); {code}; cpu = time.process_time() - t; "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]; "
    "print(cpu, hwm)"
)


def _child(code: str) -> List[float]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE.format(code=code)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [float(out[0]), float(out[1])]


def bench_client(runs: int) -> None:
    """CPU time (immune to the machine's load, unlike wall time) of the imports in a fresh
    interpreter, and its peak resident memory (VmHWM: starts again at exec)."""
    cases = (
        ("bare", "pass"),
        ("daemon (device plugin and DRA code)", "import virtdp_serve.daemon"),
        ("kubernetes client as connect() loads it", CLIENT),
        ("daemon + client", "import virtdp_serve.daemon; " + CLIENT),
        # Not loaded (kubeapi.Kube.get_json reads the Node): what it would add.
        ("client + CoreV1Api", CLIENT + "; from kubernetes.client import CoreV1Api"),
    )
    for name, code in cases:
        got = [_child(code) for _ in range(runs)]
        cpu = statistics.median(g[0] for g in got)
        hwm = statistics.median(g[1] for g in got)
        print(
            f"{'import: ' + name:<48} cpu {cpu * 1000:6.0f} ms (median of {runs}), "
            f"peak RSS {hwm / 1024:5.1f} MiB",
            flush=True,
        )


# -- publication latency ----------------------------------------------------------------------
def bench_publish(sizes: List[int], runs: int) -> None:
    with TestApiServer() as api, tempfile.TemporaryDirectory() as tmp:
        api.create("nodes", {"metadata": {"name": NODE}})
        kube = kubeapi.connect(api.kubeconfig(os.path.join(tmp, "kubeconfig")))
        for size in sizes:
            for s in api.list("resourceslices"):
                api.delete("resourceslices", s["metadata"]["name"])
            p = slices.Publisher(kube, node=NODE)
            p.start()
            try:
                base = [nic(i) for i in range(size)]
                p.update(base)
                assert p.wait_in_sync(30), p.state()
                flap: List[float] = []
                for r in range(runs):
                    changed = list(base)
                    changed[r % size] = nic(r % size, NO_CARRIER)
                    for devices in (changed, base):  # the taint, then the carrier back
                        t0 = time.perf_counter()
                        p.update(devices)
                        assert p.wait_in_sync(30), p.state()
                        flap.append(time.perf_counter() - t0)
                slices_n = len(api.list("resourceslices"))
                report(
                    f"carrier change -> slice written ({size} NICs, {slices_n} slices)",
                    flap,
                    "(target < 2 s)",
                )
                plug: List[float] = []
                current = list(base)
                for r in range(runs):
                    current = current + [nic(size + r)]
                    t0 = time.perf_counter()
                    p.update(current)
                    assert p.wait_in_sync(30), p.state()
                    plug.append(time.perf_counter() - t0)
                report(f"hot-plug -> slice written ({size} NICs)", plug, "(target < 2 s)")
            finally:
                p.stop()


# -- at rest ----------------------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child(kubeconfig: str, nics: int, state_dir: str) -> None:
    kube = kubeapi.connect(kubeconfig)
    p = slices.Publisher(kube, node=NODE)
    w = claimstatus.StatusWriter(kube, driver=slices.DEFAULT_DRIVER, state_dir=state_dir)
    p.start()
    w.start()
    p.update([nic(i) for i in range(nics)])
    assert p.wait_in_sync(60), p.state()
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.read()  # until the parent closes it
    p.stop()
    w.stop()


def bench_idle(nics: int, seconds: float) -> None:
    with TestApiServer() as api, tempfile.TemporaryDirectory() as tmp:
        api.create("nodes", {"metadata": {"name": NODE}})
        kc = api.kubeconfig(os.path.join(tmp, "kubeconfig"))
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", kc, str(nics), os.path.join(tmp, "dra")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            json.loads(proc.stdout.readline())
            time.sleep(1.0)  # the writes' own echoes settle
            requests_before = len(api.requests)
            c0, t0 = _cpu_seconds(proc.pid), time.monotonic()
            time.sleep(seconds)
            c1, t1 = _cpu_seconds(proc.pid), time.monotonic()
            requests = len(api.requests) - requests_before
            share = (c1 - c0) / (t1 - t0) * 100
            rss = 0
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
            print(
                f"{'at rest: publisher + status writer, ' + str(nics) + ' NICs':<48} "
                f"{share:.3f} % of a core over {t1 - t0:.0f} s, {requests} API requests, "
                f"RSS {rss / 1024:.1f} MiB (target < 0.5 %)",
                flush=True,
            )
        finally:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(30)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--sizes", default="1,64,256")
    ap.add_argument("--idle-nics", type=int, default=256)
    ap.add_argument("--idle-seconds", type=float, default=62.0)
    ap.add_argument("--only", default="client,publish,idle")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if "client" in only:
        bench_client(min(args.runs, 10))
    if "publish" in only:
        bench_publish([int(s) for s in args.sizes.split(",")], args.runs)
    if "idle" in only:
        bench_idle(args.idle_nics, args.idle_seconds)
    print(f"(bench process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} KiB)")


if __name__ == "__main__":
    main()
