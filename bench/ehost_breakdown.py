"""Where the milliseconds of an ehost-device call go: the executor's side step by step, the
front's side (launcher, interpreter start, imports, policy read, the wire), and the floors a
Python plugin cannot go below (interpreter start, the IPAM plugin's run, the kernel's move of a
NIC between namespaces).

Run by bench/ehost_device.py inside its node namespace, after its interleaved loop, as
`python -m bench.ehost_breakdown` from the tree's root with the source roots on PYTHONPATH; not
meant to be run alone.

Executor side: ADD, CHECK and DEL run here through `plugin.run` in a thread of their own with
the pod namespace pinned as a descriptor, as the warm executor runs them (warm: the first round
is dropped). The plugin's steps are timed by wrapping the module functions it calls; time is
counted to the innermost step running (a lookup inside the move counts as a lookup), and what
no step claims is "other" (the command's own code, logging). Means, so that the rows add up to
the total, over the fastest 80% of rounds.

Front side: medians of whole processes, each run `-n` times, interleaved. The launcher is the
PEX's /bin/sh boot (nothing in source mode); "wire" is what remains of the executor mode's wall
time after the launcher, interpreter start, imports and policy read, and the executor's own
time for the call (from its log): connect, send, the answer, the relay and the exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Tuple

from ehost_device import conf as cni
from ehost_device import ipam, locks, plugin
from virtcore import netlink, netns, sysfs

STEPS = (
    "config and policy",
    "open sockets",
    "lookups",
    "node guard",
    "lock",
    "IPAM exec",
    "move: kernel request",
    "move: rest",
    "configure",
    "temporary namespace",
    "answer",
    "other",
)


class Clock:
    """Exclusive time per step: the innermost step running gets the time."""

    def __init__(self) -> None:
        self.spent: Dict[str, float] = defaultdict(float)
        self.stack: List[str] = []
        self.mark = 0.0
        self.round_trips = 0

    def push(self, step: str) -> None:
        now = time.perf_counter()
        if self.stack:
            self.spent[self.stack[-1]] += now - self.mark
        self.stack.append(step)
        self.mark = now

    def pop(self) -> None:
        now = time.perf_counter()
        self.spent[self.stack.pop()] += now - self.mark
        self.mark = now


CLOCK = Clock()


def _timed(step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kw: Any) -> Any:
        CLOCK.push(step)
        try:
            return fn(*args, **kw)
        finally:
            CLOCK.pop()

    return wrapper


def _timed_cm(step: str, factory: Callable[..., Any]) -> Callable[..., Any]:
    @contextlib.contextmanager
    def wrapper(*args: Any, **kw: Any) -> Iterator[Any]:
        cm = factory(*args, **kw)
        CLOCK.push(step)
        try:
            value = cm.__enter__()
        finally:
            CLOCK.pop()
        try:
            yield value
        except BaseException:
            CLOCK.push(step)
            try:
                if not cm.__exit__(*sys.exc_info()):
                    raise
            finally:
                CLOCK.pop()
        else:
            CLOCK.push(step)
            try:
                cm.__exit__(None, None, None)
            finally:
                CLOCK.pop()

    return wrapper


def instrument() -> None:
    for mod, names, step in (
        (
            cni,
            ("load_env", "parse_json", "load_conf", "require_path", "refuse_node_keys"),
            "config and policy",
        ),
        (plugin, ("_node_policy", "_setup_logging"), "config and policy"),
        (netns, ("_open", "is_own"), "open sockets"),
        (netlink, ("socket_in",), "open sockets"),
        (
            netns,
            ("link_by_name", "link_by_index", "links", "addresses", "routes"),
            "lookups",
        ),
        (sysfs, ("read_function", "netdev_pci_address"), "lookups"),
        (plugin, ("_check_allowed",), "node guard"),
        (ipam, ("run", "start"), "IPAM exec"),
        (netns, ("move",), "move: rest"),
        (
            netns,
            ("set_up", "set_alias", "rename", "set_mtu", "set_mac", "add_address", "add_route"),
            "configure",
        ),
        (plugin, ("_add_result",), "answer"),
    ):
        for name in names:
            setattr(mod, name, _timed(step, getattr(mod, name)))
    ipam.Delegation.result = _timed("IPAM exec", ipam.Delegation.result)  # type: ignore
    locks.device_lock = _timed_cm("lock", locks.device_lock)
    netns.temporary_namespace = _timed_cm("temporary namespace", netns.temporary_namespace)
    set_link = netlink.Socket.set_link

    def timed_set_link(self: Any, index: int, **kw: Any) -> None:
        if kw.get("netns_fd") is None:
            return set_link(self, index, **kw)
        CLOCK.push("move: kernel request")
        try:
            return set_link(self, index, **kw)
        finally:
            CLOCK.pop()

    netlink.Socket.set_link = timed_set_link  # type: ignore[method-assign]
    request = netlink.Socket.request

    def counted_request(self: Any, kind: int, flags: int, body: bytes) -> Any:
        CLOCK.round_trips += 1
        return request(self, kind, flags, body)

    netlink.Socket.request = counted_request  # type: ignore[method-assign]


def call(env: Dict[str, str], data: bytes, pod_fd: int) -> Tuple[int, Any, Dict[str, float]]:
    """One call as the executor makes it: a thread of its own, the pod's namespace pinned."""
    box: Dict[str, Any] = {}

    def run() -> None:
        CLOCK.spent.clear()
        CLOCK.round_trips = 0
        t0 = time.perf_counter()
        CLOCK.push("other")
        try:
            with netns.pinned(env["CNI_NETNS"], pod_fd):
                status, out = plugin.run(env, data)
            CLOCK.push("answer")
            if out is not None:
                json.dumps(out)
            CLOCK.pop()
        finally:
            CLOCK.pop()
        box["status"], box["out"] = status, out
        box["spent"] = dict(CLOCK.spent, total=time.perf_counter() - t0)
        box["round_trips"] = CLOCK.round_trips

    t = threading.Thread(target=run)
    t.start()
    t.join()
    spent = {k: v * 1000 for k, v in box["spent"].items()}
    spent["netlink round trips"] = box["round_trips"]
    return box["status"], box["out"], spent


def executor_side(args: argparse.Namespace) -> Dict[str, Any]:
    instrument()
    conf = {
        "cniVersion": "1.0.0",
        "name": "bench",
        "type": "ehost-device",
        "deviceID": args.pci,
        "ipam": {
            "type": "static",
            "addresses": [{"address": "198.51.100.13/24", "gateway": "198.51.100.1"}],
            "routes": [{"dst": "203.0.113.0/24", "gw": "198.51.100.1"}],
        },
    }
    base = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_CONTAINERID": "breakdown",
        "CNI_NETNS": args.pod,
        "CNI_IFNAME": "net1",
        "CNI_PATH": "/usr/lib/cni",
        "EHOST_DEVICE_POLICY": args.policy,
    }
    pod_fd = os.open(args.pod, os.O_RDONLY | os.O_CLOEXEC)
    rounds: Dict[str, List[Dict[str, float]]] = {"ADD": [], "CHECK": [], "DEL": []}
    ipam_alone: List[float] = []
    static = dict(base, CNI_COMMAND="ADD")
    try:
        for i in range(args.n + 1):
            status, out, spent = call(
                dict(base, CNI_COMMAND="ADD"), json.dumps(conf).encode(), pod_fd
            )
            if status != 0:
                raise SystemExit(f"breakdown ADD failed: {out}")
            prev = json.dumps(dict(conf, prevResult=out)).encode()
            if i:
                rounds["ADD"].append(spent)
            for command in ("CHECK", "DEL"):
                status, out2, spent = call(dict(base, CNI_COMMAND=command), prev, pod_fd)
                if status != 0:
                    raise SystemExit(f"breakdown {command} failed: {out2}")
                if i:
                    rounds[command].append(spent)
            # The IPAM plugin alone, exec'd as the plugin execs it (its ADD has no state).
            t0 = time.perf_counter()
            subprocess.run(
                ["/usr/lib/cni/static"],
                input=json.dumps(conf).encode(),
                env=static,
                capture_output=True,
                check=True,
            )
            if i:
                ipam_alone.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(pod_fd)

    print(
        "executor side, step by step (ms; means over the fastest 80% of rounds, which add up to "
        "their total: a round stalled on the kernel's global rtnl lock by other namespaces' "
        "work says nothing of ours)"
    )
    print(f"{'step':22} {'ADD':>7} {'CHECK':>7} {'DEL':>7}")
    kept = {
        c: sorted(rs, key=lambda r: r["total"])[: max(1, len(rs) * 4 // 5)]
        for c, rs in rounds.items()
    }
    means = {
        c: {s: statistics.mean(r.get(s, 0.0) for r in rs) for s in STEPS + ("total",)}
        for c, rs in kept.items()
    }
    for c in means:
        means[c]["other"] = means[c]["total"] - sum(
            v for s, v in means[c].items() if s not in ("other", "total")
        )
    for step in STEPS + ("total",):
        print(f"{step:22} " + " ".join(f"{means[c][step]:7.2f}" for c in ("ADD", "CHECK", "DEL")))
    trips = {c: statistics.median(r["netlink round trips"] for r in rs) for c, rs in rounds.items()}
    print(f"{'netlink round trips':22} " + " ".join(f"{trips[c]:7.0f}" for c in trips))
    floor = {
        "ipam": statistics.median(ipam_alone),
        "move": statistics.median(r.get("move: kernel request", 0.0) for r in rounds["ADD"]),
        "move_del": statistics.median(r.get("move: kernel request", 0.0) for r in rounds["DEL"]),
    }
    print(
        f"floors: IPAM plugin alone (static ADD, exec to exit) {floor['ipam']:.1f} ms; "
        f"kernel move request ADD {floor['move']:.1f} ms, DEL {floor['move_del']:.1f} ms"
    )
    return conf


def _median_run(argv: List[str], env: Dict[str, str], data: bytes, n: int) -> float:
    times = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        subprocess.run(argv, input=data, env=env, capture_output=True, check=True)
        if i:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _pex_venv(pex: str) -> Tuple[str, str]:
    """(the venv's python, its site-packages) of a PEX that ran once (launcher: sh_boot)."""
    with open(pex, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    m = re.search(r'INSTALLED_PEX="\$\{PEX_ROOT\}(/venvs/[^"]+)"', head)
    d = re.search(r'DEFAULT_PEX_ROOT="(?:\$\(echo )?([^)"]+)\)?"', head)
    if not m or not d:
        raise SystemExit(f"{pex}: no sh_boot launcher found")
    venv = os.environ.get("PEX_ROOT", d.group(1)) + m.group(1)
    sites = [
        os.path.join(venv, "lib", x, "site-packages") for x in os.listdir(os.path.join(venv, "lib"))
    ]
    return os.path.join(venv, "bin", "python"), sites[0]


def front_side(args: argparse.Namespace, conf: Dict[str, Any]) -> None:
    """The front's parts, each a whole process, interleaved with real calls through the
    executor (the NIC of the executor side, container ID `front`)."""
    ours = json.loads(args.ours)
    if ours[0].endswith(".pex"):
        python, path = _pex_venv(ours[0])
    else:
        python, path = sys.executable, os.environ["PYTHONPATH"]
    prefix = "import sys; sys.path[:0] = sys.argv.pop(1).split(':'); "
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "EHOST_DEVICE_POLICY": args.policy}
    if not ours[0].endswith(".pex"):
        env["PYTHONPATH"] = path
    version = {**env, "CNI_COMMAND": "VERSION"}
    data = b'{"cniVersion": "1.0.0"}'

    def py(code: str) -> List[str]:
        return [python, "-I", "-S", "-c", prefix + code, path]

    socket = "f.executor_socket(os.environ)"
    parts = {
        "launcher": (ours, version),
        "entry": (py("from ehost_device.cli import main; sys.exit(main())"), version),
        "bare": ([python, "-I", "-S", "-c", "pass"], {}),
        "imports": (py("import ehost_device.cli, ehost_device.front"), env),
        "policy": (py("import os, ehost_device.cli as c, ehost_device.front as f; " + socket), env),
    }
    call_env = {
        **env,
        "CNI_CONTAINERID": "front",
        "CNI_NETNS": args.pod,
        "CNI_IFNAME": "net1",
        "CNI_PATH": "/usr/lib/cni",
        "EHOST_DEVICE_SOCKET": args.socket,
    }
    times: Dict[str, List[float]] = defaultdict(list)
    for i in range(args.n + 1):
        for key, (argv, e) in parts.items():
            t0 = time.perf_counter()
            subprocess.run(argv, input=data, env=e, capture_output=True, check=True)
            if i:
                times[key].append((time.perf_counter() - t0) * 1000)
        stdin = json.dumps(conf).encode()
        for command in ("ADD", "CHECK", "DEL"):
            t0 = time.perf_counter()
            p = subprocess.run(
                ours, input=stdin, env=dict(call_env, CNI_COMMAND=command), capture_output=True
            )
            if p.returncode:
                raise SystemExit(f"front {command} failed: {p.stdout!r} {p.stderr[-500:]!r}")
            if i:
                times[command].append((time.perf_counter() - t0) * 1000)
            if command == "ADD":
                stdin = json.dumps(dict(conf, prevResult=json.loads(p.stdout))).encode()
    with open(args.serve_log) as f:
        log = f.read()
    inside: Dict[str, List[float]] = defaultdict(list)
    for m in re.finditer(r" call (ADD|CHECK|DEL) front: ok in ([\d.]+) ms", log):
        inside[m.group(1)].append(float(m.group(2)))
    med = {k: statistics.median(v) for k, v in times.items()}
    served = {c: statistics.median(inside[c][1:] or [0.0]) for c in ("ADD", "CHECK", "DEL")}
    launcher = max(0.0, med["launcher"] - med["entry"])
    fixed = {
        "launcher (/bin/sh boot, exec)": launcher,
        "interpreter start (-I -S)": med["bare"],
        "imports (cli, front, lean_json)": med["imports"] - med["bare"],
    }
    print("front side (ms, medians of whole processes, interleaved with the calls below)")
    print(f"{'part':34} {'ADD':>7} {'CHECK':>7} {'DEL':>7}")
    for part, ms in fixed.items():
        print(f"{part:34} " + " ".join(f"{ms:7.2f}" for _ in range(3)))
    print(f"{'executor (its log)':34} " + " ".join(f"{served[c]:7.2f}" for c in served))
    wire = {c: med[c] - sum(fixed.values()) - served[c] for c in served}
    print(f"{'wire: connect, send, answer, exit':34} " + " ".join(f"{wire[c]:7.2f}" for c in wire))
    print(f"{'wall (executor mode)':34} " + " ".join(f"{med[c]:7.2f}" for c in served))
    policy = med["policy"] - med["imports"]
    print(
        f"on a node, without EHOST_DEVICE_SOCKET: + {policy:.2f} ms policy read "
        "(executorSocket); VERSION through the front "
        f"{med['launcher']:.1f} ms"
    )
    print(
        f"floor: interpreter start {med['bare']:.1f} ms; the front adds "
        f"{launcher + med['imports'] - med['bare']:.1f} ms to it before the wire"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--pci", required=True)
    ap.add_argument("--pod", required=True)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--ours", required=True, help="the plugin's argv (JSON)")
    ap.add_argument("--socket", required=True, help="the executor's socket")
    ap.add_argument("--serve-log", required=True, help="the executor's log (-v)")
    args = ap.parse_args()
    conf = executor_side(args)
    front_side(args, conf)


if __name__ == "__main__":
    main()
