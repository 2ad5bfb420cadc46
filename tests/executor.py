"""ehost-device's warm executor for tests: `ehost-device serve` started as shipped (the PEX under
Pants, from source in the dev loop) inside a test's node namespace, on a socket in the test's
own temp dir, stopped with SIGTERM as a DaemonSet would stop it.

MODES is what the CNI tests and the bad-input corpus are parametrized over: the same call, run
in-process (EHOST_DEVICE_SOCKET set and empty: executor off) and through the executor.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from netlab import tag
from toolrun import tool_command

MODES = ("in-process", "executor")
CALL_LINE = re.compile(r" call (\S+) \S+: (ok|error-\S+) in ")


def source_env() -> Dict[str, str]:
    """PYTHONPATH when the tool runs from source (how it finds its modules), else nothing."""
    argv = tool_command("ehost-device")
    if not argv[-1].endswith(".pex") and os.environ.get("PYTHONPATH"):
        return {"PYTHONPATH": os.environ["PYTHONPATH"]}
    return {}


class Executor:
    """One `ehost-device serve` process in namespace `netns_name` (None: ours)."""

    def __init__(
        self, tmp: Path, netns_name: Optional[str], *, extra: Optional[List[str]] = None
    ) -> None:
        # Unix socket paths are limited to 107 bytes: a short directory of our own in /tmp
        # (mkdtemp: 0700, unique), not under the test's tmp_path.
        self.run_dir = Path(tempfile.mkdtemp(prefix="ehd-", dir="/tmp"))
        self.socket = str(self.run_dir / "ehost-device.sock")
        self.log_path = tmp / f"executor-{tag(6)}.log"
        self.netns_name = netns_name
        self.extra = list(extra or [])
        self.proc: Optional[subprocess.Popen] = None
        self.socket_left = False
        self.start()

    def argv(self) -> List[str]:
        prefix = ["ip", "netns", "exec", self.netns_name] if self.netns_name else []
        serve = ["serve", "--socket", self.socket, "-v", "--grace", "20", *self.extra]
        return prefix + tool_command("ehost-device") + serve

    def start(self, *, wait: bool = True) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **source_env()}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.answers():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"executor exited {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"executor not ready in {timeout}s: {self.log()}")
            time.sleep(0.05)

    def answers(self) -> bool:
        """Whether something accepts connections on the socket (a cheap readiness check)."""
        import socket

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def env(self) -> Dict[str, str]:
        return {"EHOST_DEVICE_SOCKET": self.socket}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def calls(self) -> List[str]:
        """The CNI commands this executor served, in order."""
        return [m.group(1) for m in CALL_LINE.finditer(self.log())]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        # `ip netns exec` execs the tool: the pid is the executor's own.
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait(timeout=30)

    def stop(self, *, remove: bool = True) -> int:
        """SIGTERM, as a DaemonSet stops it; its exit status. `remove`: delete its directory
        afterwards (after checking the executor removed its socket itself)."""
        try:
            if self.proc is None or self.proc.poll() is not None:
                return self.proc.returncode if self.proc else 0
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"executor ignored SIGTERM: {self.log()}") from None
        finally:
            if remove:
                self.socket_left = os.path.exists(self.socket)
                shutil.rmtree(self.run_dir, ignore_errors=True)


def mode_env(executor: Optional[Executor]) -> Dict[str, str]:
    """The plugin environment for a mode: the executor's socket, or the executor turned off
    (never the node default /run/virtdp/ehost-device.sock, which may exist on this machine)."""
    return executor.env() if executor is not None else {"EHOST_DEVICE_SOCKET": ""}
