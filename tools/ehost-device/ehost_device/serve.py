"""The warm executor: `ehost-device serve` answers CNI calls over a unix socket with the plugin
code already loaded; `ehost-device probe` asks it whether it answers.

It runs each call through the very same `plugin.run` as in-process mode, in a thread of its own.
What makes a thread's call look like a process of its own:
- the pod's namespace is the descriptor the front passed (`netns.pinned`, thread-local), never
  the CNI_NETNS path, which may mean something else in this mount namespace;
- the environment is the front's (the IPAM plugin runs from its CNI_PATH with it);
- stderr is the front's: log lines written in the call's thread, and the IPAM plugin's stderr,
  go to the descriptor the front passed (`_RoutedStderr`, `ipam.CALL_STDERR`).
Each call is owned to its end: calls of one attachment (CNI_CONTAINERID + CNI_IFNAME) run one at
a time in arrival order (`Turns`), and an ADD whose front hangs up before its answer (killed, or
the runtime's budget ran out) does not count: it stops at its next step (`caller.checkpoint`)
and rolls back, or is undone with a DEL once done, before the attachment's next call runs.
No thread that serves a call ever switches its network namespace, and nothing but the IPAM
plugin is forked: a pod namespace's netlink socket is made by a short-lived thread of its own
(virtcore.netlink.socket_in).

Trust: the socket is root's, mode 0600, in a directory only root can write; a peer that is not
uid 0 (SO_PEERCRED) is refused, as is a front in another network namespace (the host namespace
of a call is the executor's own). Frames are size-checked; a malformed one is answered with a
refusal and the executor carries on. The wire format is in `front`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import ehost_device
from ehost_device import front, metrics

log = logging.getLogger("ehost-device-serve")

READ_TIMEOUT = 10.0  # seconds for a whole request to arrive once connected
SEND_TIMEOUT = 30.0
MAX_PARALLEL = 64  # calls served at once; more wait in the listen backlog
DEFAULT_GRACE = 30.0  # seconds SIGTERM waits for calls in flight

_CALL = threading.local()  # .stream: the stderr of the call this thread serves


class _RoutedStderr(io.TextIOBase):
    """sys.stderr in the executor: a call's thread writes to its front's stderr, any other
    thread to the executor's own."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def _target(self) -> Any:
        return getattr(_CALL, "stream", None) or self.real

    def write(self, s: str) -> int:
        return self._target().write(s)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._target().flush()

    def writable(self) -> bool:
        return True


class Turns:
    """Calls of one attachment (CNI_CONTAINERID + CNI_IFNAME) run one at a time, in the order
    their requests arrived: a runtime's DEL that follows a failed or timed-out ADD at once
    waits until that ADD has finished or been undone, as it would in-process (where the ADD
    dies with its process). NICs are serialised separately, by the per-NIC lock that
    in-process calls share."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.issued: Dict[Tuple[str, str], int] = {}  # tickets handed out, per attachment
        self.serving: Dict[Tuple[str, str], int] = {}  # the ticket whose turn it is

    def take(self, key: Tuple[str, str]) -> int:
        with self.cond:
            ticket = self.issued.get(key, 0)
            self.issued[key] = ticket + 1
            self.serving.setdefault(key, 0)
            return ticket

    def wait(self, key: Tuple[str, str], ticket: int) -> None:
        with self.cond:
            while self.serving[key] != ticket:
                self.cond.wait()

    def done(self, key: Tuple[str, str]) -> None:
        with self.cond:
            self.serving[key] += 1
            if self.serving[key] == self.issued[key]:  # nobody waits: forget the attachment
                del self.serving[key], self.issued[key]
            self.cond.notify_all()

    def pending(self) -> int:
        with self.cond:
            return sum(self.issued[k] - self.serving[k] for k in self.issued)


def _attachment(env: Dict[str, str]) -> Optional[Tuple[str, str]]:
    """The attachment a call concerns, for the commands that act on one."""
    if env.get("CNI_COMMAND") in ("ADD", "DEL", "CHECK") and env.get("CNI_CONTAINERID"):
        return (env["CNI_CONTAINERID"], env.get("CNI_IFNAME", ""))
    return None


class Refused(Exception):
    """A frame the executor does not serve; the message goes back to the peer."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(why)
        self.reason = reason  # metrics label


# -- the socket ---------------------------------------------------------------------------------


def _prepare_socket(path: str) -> socket.socket:
    """Listen at `path`: its directory made 0700 if missing and refused if others may write
    to it; a stale socket (nothing answers) replaced; a live one left alone (exit)."""
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    pst = os.stat(parent)
    if pst.st_uid != os.geteuid() or pst.st_mode & 0o022:
        raise SystemExit(
            f"ehost-device serve: {parent} is owned by uid {pst.st_uid} with mode "
            f"{pst.st_mode & 0o777:o}; expected ours and writable by us only (0700)"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SystemExit(f"ehost-device serve: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            log.warning("replacing stale socket %s", path)
            os.unlink(path)
        except OSError as e:
            raise SystemExit(f"ehost-device serve: cannot check {path}: {e.strerror}") from None
        else:
            raise SystemExit(f"ehost-device serve: another executor answers at {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise Refused("truncated", f"frame truncated: got {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _read_request(conn: socket.socket, fds: List[int]) -> Tuple[int, int, Dict[str, str], bytes]:
    """(flags, netns errno, environment, stdin) of one request; descriptors land in `fds`."""
    msg, anc, mflags, _ = conn.recvmsg(
        front.REQUEST.size, socket.CMSG_SPACE(front.MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(payload) // 4
            fds.extend(struct.unpack(f"{n}i", payload[: n * 4]))
    if mflags & socket.MSG_CTRUNC:
        raise Refused("descriptors", f"more than {front.MAX_FDS} descriptors sent")
    if not msg:
        raise Refused("empty", "connection closed before a request header")
    if len(msg) < front.REQUEST.size:
        msg += _recv_exact(conn, front.REQUEST.size - len(msg))
    magic, version, flags, err, env_len, stdin_len = front.REQUEST.unpack(msg)
    if magic != front.MAGIC:
        raise Refused(
            "magic", f"not an ehost-device request: magic {magic!r}, expected {front.MAGIC!r}"
        )
    if version != front.VERSION:
        raise Refused(
            "version", f"protocol version {version}; this executor speaks {front.VERSION}"
        )
    if flags & ~front.KNOWN_FLAGS:
        raise Refused("flags", f"unknown flags {flags:#x}")
    if env_len > front.MAX_ENV or stdin_len > front.MAX_STDIN:
        raise Refused(
            "size",
            f"frame too large: environment {env_len} bytes (at most {front.MAX_ENV}), "
            f"stdin {stdin_len} bytes (at most {front.MAX_STDIN})",
        )
    want = 1 + bool(flags & front.F_POD_NETNS) + bool(flags & front.F_STDERR)
    if len(fds) != want:
        raise Refused("descriptors", f"{len(fds)} descriptors sent; the flags announce {want}")
    body = _recv_exact(conn, env_len + stdin_len)
    try:
        env = json.loads(body[:env_len].decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Refused("environment", f"environment is not JSON: {e}") from None
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise Refused("environment", "environment must be a JSON object of strings")
    return flags, err, env, body[env_len:]


def _peer_gone(conn: socket.socket) -> bool:
    import select

    poller = select.poll()
    poller.register(conn, select.POLLRDHUP | select.POLLHUP)
    return bool(poller.poll(0))


def _drain(conn: socket.socket) -> None:
    """Read what the peer still sends (bounded): a unix socket closed with unread data resets
    the connection, and the peer would lose the refusal it is owed."""
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(1.0)
    left = front.MAX_ENV + front.MAX_STDIN
    while left > 0:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            return
        left -= len(chunk)


# -- serving ------------------------------------------------------------------------------------


class Executor:
    def __init__(self, path: str) -> None:
        self.path = path
        self.turns = Turns()
        self.slots = threading.BoundedSemaphore(MAX_PARALLEL)
        self.threads: set = set()
        self.lock = threading.Lock()
        own = os.stat("/proc/self/ns/net")
        self.own_ns = (own.st_dev, own.st_ino)

    def handle(self, conn: socket.socket) -> None:
        fds: List[int] = []
        try:
            conn.settimeout(READ_TIMEOUT)
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", creds)
            try:
                if uid != 0:
                    raise Refused(
                        "peer",
                        f"peer pid {pid} runs as uid {uid}: only root (uid 0) may hand "
                        "the executor a CNI call",
                    )
                flags, err, env, data = _read_request(conn, fds)
                st = os.fstat(fds[0])
                if (st.st_dev, st.st_ino) != self.own_ns:
                    raise Refused(
                        "namespace",
                        "the front runs in another network namespace than the executor",
                    )
            except Refused as r:
                metrics.REFUSED.labels(reason=r.reason).inc()
                # A bare connect and close is a readiness check, not worth a warning.
                level = logging.INFO if r.reason == "empty" else logging.WARNING
                log.log(level, "refused a request from pid %s: %s", pid, r)
                kind = front.MISMATCH if r.reason == "version" else front.REFUSED
                with contextlib.suppress(OSError):
                    self._reply(conn, kind, 0, str(r).encode())
                    _drain(conn)
                return
            except (OSError, struct.error) as e:
                metrics.REFUSED.labels(reason="io").inc()
                log.warning("dropped a request from pid %s: %s", pid, e)
                return
            key = _attachment(env)
            if key is None:
                self._serve_call(conn, pid, flags, err, env, data, fds)
                return
            ticket = self.turns.take(key)
            try:
                self.turns.wait(key, ticket)
                self._serve_call(conn, pid, flags, err, env, data, fds)
            finally:
                self.turns.done(key)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()

    def _serve_call(
        self,
        conn: socket.socket,
        pid: int,
        flags: int,
        pod_errno: int,
        env: Dict[str, str],
        data: bytes,
        fds: List[int],
    ) -> None:
        """Run one call (its attachment's turn held) and answer it. An ADD whose front is gone
        before the answer does not count: it is not started, stops at its next step, or is
        undone once done; a DEL or CHECK simply finishes (DEL is idempotent)."""
        command = env.get("CNI_COMMAND", "")
        if command != "DEL" and _peer_gone(conn):
            # Its front gave up (the runtime's budget, or the front was killed) while the call
            # waited for its turn or a slot; the runtime's DEL may follow or have run.
            metrics.ABANDONED.labels(command=command or "?").inc()
            log.warning("pid %s gave up before its %s ran; dropped it", pid, command or "call")
            return
        pod_fd = fds[1] if flags & front.F_POD_NETNS else None
        err_fd = fds[-1] if flags & front.F_STDERR else None
        status, out = self._run(env, data, pod_fd, pod_errno, err_fd, gone=lambda: _peer_gone(conn))
        if command == "ADD" and status == 0 and _peer_gone(conn):
            answered = False
        else:
            conn.settimeout(SEND_TIMEOUT)
            try:
                self._reply(conn, front.RESULT, status, out)
                answered = True
            except OSError as e:
                log.warning("could not answer pid %s: %s", pid, e)
                answered = False
        if answered or command != "ADD":
            return
        metrics.ABANDONED.labels(command=command).inc()
        if status != 0:  # it failed (or stopped at a step because the caller was gone): rolled back
            log.warning("pid %s gave up on its ADD; the ADD failed and was rolled back", pid)
            return
        log.warning("pid %s gave up on its ADD after it was done; undoing it", pid)
        undo_env = dict(env, CNI_COMMAND="DEL")
        status, out = self._run(undo_env, data, pod_fd, pod_errno, None, what="undo-ADD")
        if status != 0:
            log.error(
                "could not undo the abandoned ADD of %s: %s (the runtime's DEL tries again)",
                env.get("CNI_CONTAINERID", "-"),
                out.decode("utf-8", "replace").strip(),
            )

    def _reply(self, conn: socket.socket, kind: int, status: int, payload: bytes) -> None:
        head = front.RESPONSE.pack(front.MAGIC, front.VERSION, kind, status, len(payload))
        conn.sendall(head + payload)

    def _run(
        self,
        env: Dict[str, str],
        data: bytes,
        pod_fd: Optional[int],
        pod_errno: int,
        err_fd: Optional[int],
        *,
        gone: Optional[Callable[[], bool]] = None,
        what: str = "",
    ) -> Tuple[int, bytes]:
        from ehost_device import caller, ipam, plugin, version_answer
        from virtcore import netns

        command = env.get("CNI_COMMAND", "")
        if command == "VERSION":  # `probe`; fronts answer VERSION themselves
            return 0, version_answer(data).encode()
        stream = (
            open(err_fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
            if err_fd is not None
            else open(os.devnull, "w")
        )
        _CALL.stream = stream
        ipam.CALL_STDERR.fd = err_fd if err_fd is not None else -3  # subprocess.DEVNULL
        metrics.IN_FLIGHT.inc()
        t0 = time.monotonic()
        status, result = 1, "error"
        try:
            with netns.pinned(env.get("CNI_NETNS", ""), pod_fd, pod_errno), caller.watching(gone):
                status, out = plugin.run(env, data)
            result = "ok" if status == 0 else f"error-{out.get('code') if out else '?'}"
            return status, (json.dumps(out) + "\n").encode() if out is not None else b""
        finally:
            elapsed = time.monotonic() - t0
            metrics.IN_FLIGHT.dec()
            metrics.call_done(command or "?", result, elapsed)
            log.info(
                "call %s %s: %s in %.1f ms",
                what or command or "-",
                env.get("CNI_CONTAINERID", "") or "-",
                result,
                elapsed * 1000,
            )
            _CALL.stream = None
            ipam.CALL_STDERR.fd = None
            with contextlib.suppress(OSError, ValueError):
                stream.close()

    def _thread(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except Exception:
            log.exception("unexpected failure serving a call")
        finally:
            with self.lock:
                self.threads.discard(threading.current_thread())
            self.slots.release()

    def serve(self, listener: socket.socket) -> None:
        """Accept calls until SIGTERM. The signal interrupts only a wait (for a free slot or a
        connection); elsewhere it is noted and acted on before the next wait, so a call
        accepted is always handed to a started thread."""
        while not _STOP.requested:
            _STOP.interruptible = True
            try:
                self.slots.acquire()
                try:
                    conn, _ = listener.accept()
                except BaseException:
                    self.slots.release()
                    raise
            finally:
                _STOP.interruptible = False
            t = threading.Thread(target=self._thread, args=(conn,), daemon=True)
            with self.lock:
                self.threads.add(t)
            t.start()
        raise _Stop(_STOP.requested)

    def drain(self, grace: float) -> bool:
        deadline = time.monotonic() + grace
        while True:
            with self.lock:
                left = list(self.threads)
            if not left:
                return True
            if time.monotonic() >= deadline:
                return False
            left[0].join(max(0.0, min(0.5, deadline - time.monotonic())))


class _Stop(Exception):
    pass


class _StopState:
    requested = ""  # the signal's name once one came
    interruptible = False  # the main thread is waiting for a call


_STOP = _StopState()


def _stop(signum: int, frame: Any) -> None:
    # Only this process runs it: the executor forks nothing but IPAM plugins, which exec at
    # once (subprocess forks and execs in C, where no Python handler runs).
    _STOP.requested = signal.Signals(signum).name
    if _STOP.interruptible:
        raise _Stop(_STOP.requested)


def _warm_up() -> None:
    """Import what every call needs, and read the links once, before the first call: the first
    call then costs what every other does."""
    from ehost_device import plugin  # noqa: F401
    from virtcore import netlink, netns

    with netns.open_ns(None) as sock:
        netns.links(sock)
    if not hasattr(os, "setns"):
        netlink.libc()  # ctypes, for setns before Python 3.12


def serve(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s ehost-device serve[%(process)d] %(levelname)s %(message)s")
    )
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    import faulthandler

    # `kill -USR1` prints every thread's stack to the executor's stderr: what a stuck call waits on.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    _warm_up()
    if args.metrics_address:
        metrics.serve(args.metrics_address)
    listener = _prepare_socket(args.socket)
    ino = os.stat(args.socket).st_ino
    sys.stderr = _RoutedStderr(sys.stderr)
    executor = Executor(args.socket)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.warning("serving CNI calls on %s", args.socket)
    try:
        executor.serve(listener)
    except _Stop as e:
        log.warning("%s: no new calls; finishing those in flight", e)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            if os.stat(args.socket).st_ino == ino:  # not a successor's
                os.unlink(args.socket)
    if not executor.drain(args.grace):
        log.warning("calls still in flight after %gs; exiting anyway", args.grace)
    return 0


def probe(args: argparse.Namespace) -> int:
    """Exit 0 when the executor at --socket answers a VERSION request."""
    env = {"CNI_COMMAND": "VERSION"}
    answer = front.call(args.socket, env, b'{"cniVersion": "1.1.0"}', timeout=args.timeout)
    if answer is None or answer[0] != 0:
        sys.stderr.write(f"ehost-device probe: no executor answers at {args.socket}\n")
        return 1
    sys.stdout.write(answer[1].decode())
    return 0


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="ehost-device",
        description="ehost-device, the CNI plugin for virtio NICs. Run by a container runtime "
        "(CNI_COMMAND set) it plumbs one NIC; `serve` runs the warm executor that answers "
        "those calls on a node, `probe` checks that it answers, `install-policy` installs the "
        "node policy from the DaemonSet's ConfigMap (see `ehost-device install-policy --help`).",
    )
    ap.add_argument(
        "--version",
        action="version",
        version=f"ehost-device {ehost_device.__version__}",
        help="print the version and exit",
    )
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve", help="answer CNI calls on a unix socket (the warm executor)")
    s.add_argument(
        "--socket",
        default=front.DEFAULT_SOCKET,
        help=f"socket path (default {front.DEFAULT_SOCKET})",
    )
    s.add_argument("--metrics-address", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    s.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        help="seconds SIGTERM waits for calls in flight",
    )
    s.add_argument("-v", "--verbose", action="store_true", help="log every call")
    p = sub.add_parser("probe", help="exit 0 if the executor answers (a readiness probe)")
    p.add_argument("--socket", default=front.DEFAULT_SOCKET)
    p.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    if args.mode == "serve":
        return serve(args)
    return probe(args)
