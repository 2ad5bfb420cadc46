"""Benchmark: ehost-device, in-process and through its warm executor, against Debian's Go
host-device plugin: ADD / CHECK / DEL wall time; the front alone; the executor's memory.

Run by hand, as root:  python3 bench/ehost_device.py [-n 30]

All three get the same setup: a node namespace (the "host") with one veth NIC each, a pod
namespace each, the same static IPAM, cniVersion 1.0.0 (the newest host-device speaks). The
timing loop runs inside the node namespace (`ip netns exec`, as a runtime would run the
plugins on the host) so `ip netns exec` itself is not timed; the executor (`ehost-device serve`)
runs there too, on a socket in a temporary directory. Runs are interleaved, rotating which
goes first; medians and the ratio to host-device are printed, one table per mode, then where
the executor mode's time goes (the executor's own time per call, from its log, against the
front's wall time), VERSION through the front against a bare `python3 -I -S -c pass`, the
idle executor's resident memory, and then, from bench/ehost_breakdown.py, where each millisecond
of ADD, CHECK and DEL goes on the executor's side and on the front's.
ehost-device runs as `dist/ehost-device.pex` if that exists (and --source is not given), else
`python -m ehost_device` with the interpreter running this script.
Everything it makes is deleted at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
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


def _median_call(argv: List[str], env: Dict, data: str, n: int) -> float:
    times = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        subprocess.run(argv, input=data.encode(), env=env, capture_output=True, check=True)
        if i:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def inner(args: argparse.Namespace) -> None:
    """The timing loop, inside the node namespace."""
    ours = ehost_command(args.source)
    ours_env = {} if ours[0].endswith(".pex") else {"PYTHONPATH": os.environ["BENCH_PYTHONPATH"]}
    # The node policy points ehost-device at the fake tree (never the network config).
    policy = os.path.join(os.path.dirname(os.path.abspath(args.sysfs)), "ehost-device.yaml")
    with open(policy, "w") as f:
        f.write(f"sysfsRoot: {json.dumps(args.sysfs)}\n")
    ours_env["EHOST_DEVICE_POLICY"] = policy
    run_dir = tempfile.mkdtemp(prefix="ehd-bench-", dir="/tmp")
    sock = os.path.join(run_dir, "ehost-device.sock")
    serve_log = open(os.path.join(run_dir, "serve.log"), "w+")
    serve = subprocess.Popen(
        ours + ["serve", "--socket", sock, "-v"],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **ours_env},
        stdout=serve_log,
        stderr=serve_log,
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if serve.poll() is not None or time.monotonic() > deadline:
                serve_log.seek(0)
                raise SystemExit(f"the executor did not start: {serve_log.read()}")
            time.sleep(0.05)
        _timing(args, ours, ours_env, sock, serve, serve_log, policy)
    finally:
        serve.terminate()
        serve.wait(30)
        serve_log.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _timing(args, ours, ours_env, sock, serve, serve_log, policy) -> None:  # type: ignore[no-untyped-def]
    def ehost(pci: str, addr: str) -> Dict:
        return {
            "cniVersion": VERSION,
            "name": "bench",
            "type": "ehost-device",
            "deviceID": pci,
            "ipam": ipam(addr),
        }

    plugins = {
        "in-process": (
            ours,
            ehost("0000:00:05.0", "198.51.100.10/24"),
            args.pod_a,
            {**ours_env, "EHOST_DEVICE_SOCKET": ""},
        ),
        "executor": (
            ours,
            ehost("0000:00:07.0", "198.51.100.12/24"),
            args.pod_c,
            {**ours_env, "EHOST_DEVICE_SOCKET": sock},
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
        rot = order[i % len(order) :] + order[: i % len(order)]
        for name in rot:
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
    for mode in ("in-process", "executor"):
        print(f"mode: {mode}")
        print(f"{'command':8} {'ehost-device ms':>16} {'host-device ms':>15} {'ratio':>7}")
        for c in ("ADD", "CHECK", "DEL"):
            a, b = med[mode][c], med["host-device"][c]
            print(f"{c:8} {a:16.1f} {b:15.1f} {a / b:7.2f}")
        total_a = sum(med[mode].values())
        total_b = sum(med["host-device"].values())
        print(f"{'total':8} {total_a:16.1f} {total_b:15.1f} {total_a / total_b:7.2f}")

    # Where the executor mode's time goes: the executor's own time per call (its log) against
    # the wall time the runtime sees; the rest is the front (interpreter start, connect, relay).
    serve_log.seek(0)
    served: Dict[str, List[float]] = {"ADD": [], "CHECK": [], "DEL": []}
    for m in re.finditer(r" call (ADD|CHECK|DEL) \S+: ok in ([\d.]+) ms", serve_log.read()):
        served[m.group(1)].append(float(m.group(2)))
    print("executor mode, where the time goes (medians)")
    print(f"{'command':8} {'wall ms':>9} {'in executor ms':>15} {'front+wire ms':>14}")
    for c in ("ADD", "CHECK", "DEL"):
        inside = statistics.median(served[c][1:] or [0.0])
        wall = med["executor"][c]
        print(f"{c:8} {wall:9.1f} {inside:15.1f} {wall - inside:14.1f}")

    # The front alone: VERSION through it, against the bare interpreter start.
    version_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "VERSION", **ours_env}
    front = _median_call(ours, version_env, '{"cniVersion": "1.0.0"}', args.n)
    bare = _median_call(["/usr/bin/python3", "-I", "-S", "-c", "pass"], {}, "", args.n)
    print(
        f"front VERSION {front:.1f} ms   bare python3 -I -S {bare:.1f} ms   "
        f"ratio {front / bare:.2f}"
    )

    # The idle executor: resident memory, and CPU over a quiet second.
    time.sleep(1.0)
    ticks = _cpu_ticks(serve.pid)
    time.sleep(2.0)
    idle_cpu = _cpu_ticks(serve.pid) - ticks
    rss = _rss_kib(serve.pid) / 1024
    print(f"executor idle RSS {rss:.1f} MiB   CPU ticks in 2 s idle: {idle_cpu}")
    sys.stdout.flush()

    # Where each millisecond goes: a process of its own, run as bench.ehost_breakdown from the
    # tree's root, where this file's name does not hide the ehost_device package.
    subprocess.run(
        [sys.executable, "-m", "bench.ehost_breakdown", "-n", str(args.n)]
        + ["--pci", "0000:00:08.0", "--pod", args.pod_d, "--policy", policy]
        + ["--ours", json.dumps(ours), "--socket", sock, "--serve-log", serve_log.name],
        env={**os.environ, "PYTHONPATH": os.environ["BENCH_PYTHONPATH"]},
        cwd=ROOT,
        check=True,
    )


def outer(args: argparse.Namespace) -> None:
    from fakesysfs import FakeSysfs
    from netlab import Netns, ip, veth

    made: List[Netns] = []
    try:
        names = ("bn", "bw", "bpa", "bpb", "bpc", "bpd")
        node, wire, pod_a, pod_b, pod_c, pod_d = (Netns(p) for p in names)
        made += [node, wire, pod_a, pod_b, pod_c, pod_d]
        veth(node, "ens5", wire, f"w{secrets.token_hex(3)}")
        veth(node, "ens6", wire, f"w{secrets.token_hex(3)}")
        veth(node, "ens7", wire, f"w{secrets.token_hex(3)}")
        veth(node, "ens8", wire, f"w{secrets.token_hex(3)}")
        with tempfile.TemporaryDirectory() as tmp:
            fake = FakeSysfs(Path(tmp) / "sys")
            mac = json.loads(ip("-j", "link", "show", "ens5", ns=node.name).stdout)[0]["address"]
            fake.add_virtio_nic("0000:00:05.0", "ens5", mac=mac)
            mac7 = json.loads(ip("-j", "link", "show", "ens7", ns=node.name).stdout)[0]["address"]
            fake.add_virtio_nic("0000:00:07.0", "ens7", mac=mac7)
            mac8 = json.loads(ip("-j", "link", "show", "ens8", ns=node.name).stdout)[0]["address"]
            fake.add_virtio_nic("0000:00:08.0", "ens8", mac=mac8)
            env = dict(
                os.environ,
                BENCH_PYTHONPATH=os.pathsep.join(
                    str(ROOT / p) for p in ("libs/virtcore", "tools/ehost-device")
                ),
            )
            subprocess.run(
                ["ip", "netns", "exec", node.name, sys.executable, __file__, "--inner"]
                + ["-n", str(args.n), "--sysfs", str(fake.root)]
                + ["--pod-a", pod_a.path, "--pod-b", pod_b.path, "--pod-c", pod_c.path]
                + ["--pod-d", pod_d.path]
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
    ap.add_argument("--pod-c", help=argparse.SUPPRESS)
    ap.add_argument("--pod-d", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        inner(args)
    else:
        outer(args)


if __name__ == "__main__":
    main()
