"""The warm executor's own contract (the CNI behaviour itself is every other test here, run in
both modes): failures of the executor, its fallback, its trust boundary, its concurrency.

- SIGKILLed at points of an ADD: the front answers 11; the runtime's DEL, in either mode,
  brings the NIC home and releases the lease.
- Restarted while calls arrive: every call succeeds or fails with 11; nothing is lost.
- Silent (SIGSTOPped): 11 within the budget; the executor, woken, drops the abandoned call.
- A peer that is not root is refused; a socket that is not root's and private is not used.
- Another protocol version answering: the front runs the call in-process.
- 16 calls at once; an in-process ADD racing an executor ADD of one NIC: one winner.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
from conftest import CNI_BIN, Rig, finish
from executor import Executor, source_env
from fakesysfs import FakeSysfs

from ehost_device import front, locks

PCI = "0000:00:05.0"


@pytest.fixture
def erig(tmp_path: Path, fake_sysfs: FakeSysfs) -> Iterator[Rig]:
    """A rig whose plugin calls go through an executor."""
    r = Rig(tmp_path, fake_sysfs, "executor")
    try:
        yield r
    finally:
        r.close()


def _in_process() -> dict:
    return {"EHOST_DEVICE_SOCKET": ""}


def _slow_ipam(rig: Rig, where: str) -> str:
    """A directory holding `slow-ipam`: host-local with a pause `before` or `after` it
    allocates on ADD; it notes its pid and when it is paused."""
    d = rig.tmp / "slowbin"
    d.mkdir(exist_ok=True)
    marks = rig.tmp / "marks"
    marks.mkdir(exist_ok=True)
    if where == "before":
        body = f"echo $$ > {marks}/pid\ntouch {marks}/paused\nsleep 3\nexec {CNI_BIN}/host-local\n"
    else:
        body = (
            f"echo $$ > {marks}/pid\nout=$({CNI_BIN}/host-local)\nrc=$?\n"
            f'touch {marks}/paused\nsleep 3\necho "$out"\nexit $rc\n'
        )
    script = d / "slow-ipam"
    script.write_text(
        '#!/bin/sh\nif [ "$CNI_COMMAND" != ADD ]; then exec ' + f"{CNI_BIN}/host-local; fi\n" + body
    )
    script.chmod(0o755)
    return f"{d}:{CNI_BIN}"


def _wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _wait_gone(pid_file: Path) -> None:
    pid = int(pid_file.read_text())
    _wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, f"IPAM pid {pid} to finish")


@pytest.mark.parametrize("del_mode", ["in-process", "executor"])
@pytest.mark.parametrize("point", ["waiting-for-lock", "ipam-before-lease", "ipam-after-lease"])
def test_sigkill_during_add_then_del_brings_everything_home(erig: Rig, point: str, del_mode: str):
    rig = erig
    assert rig.executor is not None
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    marks = rig.tmp / "marks"
    cni_path = CNI_BIN
    conf = rig.conf("1.0.0", deviceID=PCI, lockTimeout=30)
    held = -1
    if point == "waiting-for-lock":
        path = locks.lock_path(str(rig.fake.root), PCI)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        held = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(held, fcntl.LOCK_EX)
    else:
        cni_path = _slow_ipam(rig, "before" if point == "ipam-before-lease" else "after")
        conf["ipam"]["type"] = "slow-ipam"
    try:
        add = rig.cni("ADD", conf, pod=pod, cni_path=cni_path, background=True)
        if held >= 0:
            time.sleep(1.0)  # the executor is in the lock's wait loop
        else:
            _wait_for(lambda: (marks / "paused").exists(), 30, "the IPAM plugin to pause")
        rig.executor.kill(signal.SIGKILL)
        out, err = add.communicate(timeout=60)
        failed = finish(add.returncode, out, err).error(11)
        assert "executor" in failed["msg"], failed
    finally:
        if held >= 0:
            os.close(held)
    if point != "waiting-for-lock":
        _wait_gone(marks / "pid")  # the orphaned IPAM plugin ran to its end
    # The runtime's DEL after a failed ADD.
    env = _in_process()
    if del_mode == "executor":
        rig.executor.start()  # replaces the stale socket the SIGKILL left
        env = rig.executor.env()
    rig.cni("DEL", conf, pod=pod, cni_path=cni_path, env=env).ok()
    assert rig.state("ens5") == before
    assert not rig.has_link("net1", pod)
    assert rig.leases() == []
    if del_mode == "in-process":
        rig.executor.start()  # the rig's teardown stops it cleanly
        rig.forwarded = 0  # the one call it took was killed before it could report


def test_restart_under_load_every_call_succeeds_or_says_try_again(erig: Rig):
    rig = erig
    assert rig.executor is not None
    nics = [(f"0000:00:{5 + i:02x}.0", f"ens{5 + i}") for i in range(4)]
    for pci, name in nics:
        rig.nic(pci, name)
    before = {name: rig.state(name) for _, name in nics}
    pods = [rig.pod() for _ in nics]
    outcomes = []
    guard = threading.Lock()
    stop = threading.Event()

    def churn(k: int) -> None:
        pci, _ = nics[k]
        conf = rig.conf("1.0.0", deviceID=pci)
        n = 0
        while not stop.is_set():
            cid = f"load{k}x{n}"
            n += 1
            add = rig.cni("ADD", conf, pod=pods[k], container_id=cid)
            # DEL until it succeeds, as a runtime does after a failed ADD or a failed DEL.
            dels = []
            for _ in range(20):
                d = rig.cni("DEL", conf, pod=pods[k], container_id=cid)
                dels.append(d)
                if d.rc == 0:
                    break
                time.sleep(0.1)
            with guard:
                outcomes.append((add, dels))

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(len(nics))]
    for t in threads:
        t.start()
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM):
            time.sleep(1.5)
            if sig == signal.SIGTERM:
                assert rig.executor.stop(remove=False) == 0
            else:
                rig.executor.kill(sig)
            time.sleep(0.3)  # calls meanwhile run in-process (no socket, or refused)
            rig.executor.start()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert len(outcomes) >= 8
    for add, dels in outcomes:
        assert add.rc == 0 or add.error(11), add.stdout
        for d in dels:
            assert d.rc == 0 or d.error(11), d.stdout
        assert dels[-1].rc == 0, [d.stdout for d in dels]
    for _, name in nics:
        assert rig.state(name) == before[name]
    assert rig.leases() == []
    assert rig.executor.calls(), "the executor served nothing"


def test_silent_executor_is_try_again_and_the_abandoned_call_is_dropped(erig: Rig):
    rig = erig
    assert rig.executor is not None
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI)
    rig.executor.kill(signal.SIGSTOP)
    try:
        err = rig.cni("ADD", conf, pod=pod, env={"EHOST_DEVICE_TIMEOUT": "1.5"}).error(11)
        assert "did not answer in time" in err["msg"], err
    finally:
        rig.executor.kill(signal.SIGCONT)
    _wait_for(lambda: "gave up" in rig.executor.log(), 30, "the executor to drop the call")
    assert rig.state("ens5") == before and not rig.has_link("net1", pod)
    assert rig.leases() == []
    rig.cni("DEL", conf, pod=pod).ok()  # what the runtime does next
    out = rig.cni("ADD", conf, pod=pod).ok()  # and the executor serves again
    rig.cni("DEL", dict(conf, prevResult=out), pod=pod).ok()
    assert rig.state("ens5") == before


def _shared_dir() -> Path:
    """A directory others can enter (for the socket of the non-root tests)."""
    d = Path(tempfile.mkdtemp(prefix="ehd-open-", dir="/tmp"))
    d.chmod(0o755)
    return d


def test_peer_that_is_not_root_is_refused(erig: Rig):
    rig = erig
    ex = rig.executor
    assert ex is not None
    # Open the socket to everyone, so that a non-root peer reaches the SO_PEERCRED check.
    ex.run_dir.chmod(0o755)
    os.chmod(ex.socket, 0o666)
    client = (
        "import json, os, socket, struct, sys\n"
        "env = {'CNI_COMMAND': 'DEL', 'CNI_CONTAINERID': 'x', 'CNI_IFNAME': 'n'}\n"
        "env = json.dumps(env).encode()\n"
        "data = b'{}'\n"
        f"head = struct.pack('!4sHHHII', b'EHDX', {front.VERSION}, 0, 0, len(env), len(data))\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "fd = os.open('/proc/self/ns/net', os.O_RDONLY)\n"
        "anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack('i', fd))]\n"
        "s.sendmsg([head + env + data], anc)\n"
        "s.shutdown(socket.SHUT_WR)\n"
        "reply = b''\n"
        "while True:\n"
        "    c = s.recv(4096)\n"
        "    if not c: break\n"
        "    reply += c\n"
        "print(struct.unpack('!4sHHiI', reply[:16])[2], reply[16:].decode())\n"
    )
    p = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            rig.node.name,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-I",
            "-c",
            client,
            ex.socket,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    kind, _, reason = p.stdout.strip().partition(" ")
    assert int(kind) == front.REFUSED
    assert "uid 65534" in reason and "only root" in reason, reason
    assert "peer pid" in ex.log() and ex.calls() == []


@pytest.mark.parametrize("defect", ["socket-owner", "socket-mode", "dir-mode"])
def test_socket_that_is_not_roots_and_private_is_not_used(erig: Rig, defect: str):
    rig = erig
    ex = rig.executor
    assert ex is not None
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    if defect == "socket-owner":
        os.chown(ex.socket, 65534, 65534)
    elif defect == "socket-mode":
        os.chmod(ex.socket, 0o660)
    else:
        ex.run_dir.chmod(0o777)
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI)
    add = rig.cni("ADD", conf, pod=pod)
    out = add.ok()  # run in-process instead
    assert "not using executor socket" in add.stderr, add.stderr
    rig.cni("DEL", dict(conf, prevResult=out), pod=pod).ok()
    assert rig.state("ens5") == before
    assert ex.calls() == [], "the executor was used through an untrusted socket"
    # Put it right again: the teardown checks that the executor removes its own socket.
    os.chown(ex.socket, 0, 0)
    os.chmod(ex.socket, 0o600)
    ex.run_dir.chmod(0o700)
    rig.forwarded = 0


def test_other_protocol_version_runs_in_process():
    """A stand-in executor that speaks version 2 answers MISMATCH: the front runs the call
    itself (here VERSION is not it: STATUS, which needs no NIC)."""
    d = Path(tempfile.mkdtemp(prefix="ehd-", dir="/tmp"))
    path = str(d / "x.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    os.chmod(path, 0o600)
    srv.listen(4)
    seen = []

    def answer() -> None:
        conn, _ = srv.accept()
        msg, anc, _, _ = conn.recvmsg(front.REQUEST.size, socket.CMSG_SPACE(16))
        for _, _, fds in anc:
            for fd in struct.unpack(f"{len(fds) // 4}i", fds):
                os.close(fd)
        seen.append(front.REQUEST.unpack(msg)[1])
        conn.sendall(front.RESPONSE.pack(front.MAGIC, 2, front.MISMATCH, 0, 0))
        conn.close()

    t = threading.Thread(target=answer)
    t.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fake = FakeSysfs(Path(tmp) / "sys")
            conf = {
                "cniVersion": "1.1.0",
                "name": "n",
                "type": "ehost-device",
            }
            from toolrun import node_policy, tool_command

            env = {
                "PATH": "/usr/bin:/bin",
                "CNI_COMMAND": "STATUS",
                "EHOST_DEVICE_SOCKET": path,
                **node_policy(Path(tmp) / "policy.yaml", str(fake.root)),
                **source_env(),
            }
            p = subprocess.run(
                tool_command("ehost-device"),
                input=json.dumps(conf),
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert p.returncode == 0, (p.stdout, p.stderr)  # STATUS in-process: the tree is readable
        t.join(10)
        assert seen == [front.VERSION]
    finally:
        srv.close()
        os.unlink(path)
        d.rmdir()


def test_sixteen_calls_at_once(erig: Rig):
    rig = erig
    assert rig.executor is not None
    nics = [(f"0000:00:{0x10 + i:02x}.0", f"eth{i}") for i in range(16)]
    for pci, name in nics:
        rig.nic(pci, name)
    pods = [rig.pod() for _ in nics]
    before = {name: rig.state(name) for _, name in nics}

    def cycle(k: int) -> tuple:
        conf = rig.conf("1.0.0", deviceID=nics[k][0])
        out = rig.cni("ADD", conf, pod=pods[k], container_id=f"c{k}").ok()
        rig.cni("CHECK", dict(conf, prevResult=out), pod=pods[k], container_id=f"c{k}").ok()
        rig.cni("DEL", dict(conf, prevResult=out), pod=pods[k], container_id=f"c{k}").ok()
        return out["interfaces"][0]["pciID" if "pciID" in out["interfaces"][0] else "name"]

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(cycle, range(16)))
    for _, name in nics:
        assert rig.state(name) == before[name]
    assert rig.leases() == []
    calls = rig.executor.calls()
    assert calls.count("ADD") == 16 and calls.count("DEL") == 16, calls


def test_in_process_and_executor_race_for_one_nic(erig: Rig):
    """The per-device lock is one for both modes: exactly one ADD wins."""
    rig = erig
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    for round_ in range(3):
        pods = [rig.pod(), rig.pod()]
        conf = rig.conf("1.0.0", deviceID=PCI)
        envs = [None, _in_process()]
        procs = [
            rig.cni("ADD", conf, pod=p, container_id=f"m{round_}-{i}", env=envs[i], background=True)
            for i, p in enumerate(pods)
        ]
        runs = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            runs.append(finish(p.returncode, out, err))
        winners = [i for i, r in enumerate(runs) if r.rc == 0]
        assert len(winners) == 1, [r.stdout for r in runs]
        runs[1 - winners[0]].error(102)
        for i, p in enumerate(pods):
            rig.cni("DEL", conf, pod=p, container_id=f"m{round_}-{i}", env=envs[i]).ok()
        assert rig.state("ens5") == before and rig.leases() == []


def test_serve_refuses_a_directory_others_may_write(tmp_path: Path):
    d = _shared_dir()
    try:
        d.chmod(0o777)
        from toolrun import tool_command

        p = subprocess.run(
            [*tool_command("ehost-device"), "serve", "--socket", str(d / "s.sock")],
            env={"PATH": "/usr/bin:/bin", **source_env()},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode != 0
        assert "0700" in p.stderr and str(d) in p.stderr, p.stderr
        assert not (d / "s.sock").exists()
        assert stat.S_IMODE(d.stat().st_mode) == 0o777
    finally:
        d.rmdir()


def test_front_path_imports_no_plugin_machinery(erig: Rig):
    """A call through the executor loads no logging, dataclasses, typing or subprocess in the
    front, nor the socket module (enum, selectors) nor __future__: only what moving bytes
    needs."""
    rig = erig
    rig.nic(PCI, "ens5")
    pod = rig.pod()
    code = (
        "import os, posix, sys\n"
        "real_exit = posix._exit\n"
        "def report(status):\n"
        "    heavy = sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "        ('logging', 'dataclasses', 'typing', 'subprocess', 'asyncio', 'socket', 'enum',\n"
        "         'selectors', '__future__', 'ehost_device.plugin', 'ehost_device.conf',\n"
        "         'virtcore'))\n"
        "    sys.stderr.write('HEAVY=' + ','.join(heavy) + '\\n'); sys.stderr.flush()\n"
        "    real_exit(status)\n"
        "os._exit = posix._exit = report\n"
        "from ehost_device.cli import main\n"
        "main()\n"
    )

    argv = ["/usr/bin/env", "python3", "-c", code]
    if not source_env():
        pytest.skip("checks the front from source (the PEX's own bootstrap loads more)")
    run = rig.cni("DEL", rig.conf("1.0.0", deviceID=PCI), pod=pod, argv=argv)
    run.ok()
    (line,) = (x for x in run.stderr.splitlines() if x.startswith("HEAVY="))
    assert line == "HEAVY=", line
    assert rig.executor is not None and rig.executor.calls() == ["DEL"]


def test_metrics_count_calls_latency_and_refusals(tmp_path: Path, fake_sysfs: FakeSysfs):
    """--metrics-address: calls by command and result, a latency histogram, calls in flight,
    frames refused, in the Prometheus text format, read from inside the node namespace."""
    port = 20000 + os.getpid() % 20000
    rig = Rig(tmp_path, fake_sysfs, "in-process")
    try:
        rig.executor = Executor(
            tmp_path, rig.node.name, extra=["--metrics-address", f"127.0.0.1:{port}"]
        )
        rig.nic(PCI, "ens5")
        pod = rig.pod()
        conf = rig.conf("1.0.0", deviceID=PCI)
        out = rig.cni("ADD", conf, pod=pod).ok()
        rig.cni("ADD", conf, pod=rig.pod(), container_id="other").error(102)
        rig.cni("DEL", dict(conf, prevResult=out), pod=pod).ok()
        fetch = (
            "import urllib.request, sys;"
            f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read()"
            ".decode())"
        )
        text = rig.node.exec("python3", "-I", "-c", fetch).stdout
    finally:
        rig.close()
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for family in text_string_to_metric_families(text)
        for x in family.samples
    }
    types = {f.name: f.type for f in text_string_to_metric_families(text)}

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("ehost_device_calls_total", command="ADD", result="ok") == 1, text
    assert value("ehost_device_calls_total", command="ADD", result="error-102") == 1, text
    assert value("ehost_device_calls_total", command="DEL", result="ok") == 1, text
    assert value("ehost_device_call_seconds_count", command="ADD") == 2, text
    assert value("ehost_device_call_seconds_bucket", command="ADD", le="+Inf") == 2, text
    assert value("ehost_device_calls_in_flight") == 0 and "ehost_device_calls_in_flight" in text
    # The readiness checks' bare connects.
    assert value("ehost_device_frames_refused_total", reason="empty") >= 1, text
    assert types["ehost_device_call_seconds"] == "histogram"


def test_node_policy_names_the_socket_or_turns_the_executor_off(erig: Rig):
    # Without EHOST_DEVICE_SOCKET in the plugin's environment, the node policy's
    # executorSocket says where the executor is; "" there turns it off. Never the network
    # config: a tenant's executorSocket is refused (tests/corpus/cni/node-executor-socket.json).
    rig = erig
    assert rig.executor is not None
    rig.nic(PCI, "ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI)
    rig.write_policy(executorSocket=rig.executor.socket)
    before = len(rig.executor.calls())
    rig.cni("ADD", conf, pod=pod, drop=("EHOST_DEVICE_SOCKET",)).ok()
    assert rig.executor.calls()[before:] == ["ADD"]
    rig.write_policy(executorSocket="")
    rig.cni("DEL", conf, pod=pod, drop=("EHOST_DEVICE_SOCKET",)).ok()
    assert rig.executor.calls()[before:] == ["ADD"], "DEL went to the executor"
    assert rig.has_link("ens5") and rig.leases() == []
