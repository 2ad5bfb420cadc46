"""The front: hand one CNI call to the warm executor (`serve`) and relay its answer.

This is what a runtime execs, so it imports only built-in modules: `posix`, `_socket` and
`_struct` (the C modules behind os, socket and struct: `import os` costs a sixth of the bare
interpreter's start, `import socket` as much again as that start, with enum and selectors), and
`lean_json` (the JSON accelerator; `import json` alone costs a third of the front's run): no
logging, no dataclasses. It moves bytes and decides
nothing about the call itself. It sends the whole environment, stdin as is, and three
descriptors (SCM_RIGHTS): its own network namespace (the executor serves only fronts in its own
namespace), the pod's (CNI_NETNS, opened here, so the executor never resolves that path in its
own mount namespace), and the write end of a pipe it relays to its stderr (the executor's log
lines and the IPAM plugin's stderr for this call).

`call` answers None when the call should run in-process instead: executor turned off, no socket,
a socket that is not root's and private, connection refused, another protocol version, a call
too large for a frame, or a refusal (e.g. another namespace). Once the executor has the call,
there is no fallback: it may have changed things; a dead or silent executor is CNI error 11
(try again later), and the runtime's DEL cleans up, as after any failed ADD.

The wire (both directions): a fixed header, then the payload.
  request:  REQUEST header (magic, version, flags, netns errno, env length, stdin length),
            the environment as a JSON object, stdin's bytes.
  response: RESPONSE header (magic, version, kind, status, payload length), the payload:
            RESULT: exit status and stdout's bytes; REFUSED: a reason (UTF-8);
            MISMATCH: the executor speaks another version (its own in the header).
"""

import posix
import sys

import _socket
import _struct

from ehost_device import DEFAULT_SOCKET as DEFAULT_SOCKET
from ehost_device import lean_json

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms to import; the annotations (quoted) need it for mypy only
    from typing import Dict, List, Mapping, Optional, Tuple

MAGIC = b"EHDX"
VERSION = 1
REQUEST = _struct.Struct("!4sHHHII")  # magic, version, flags, netns errno, env len, stdin len
RESPONSE = _struct.Struct("!4sHHiI")  # magic, version, kind, status, payload len
F_POD_NETNS = 0x1  # a pod netns descriptor follows the front's own netns descriptor
F_STDERR = 0x2  # the write end of the front's stderr relay comes last
KNOWN_FLAGS = F_POD_NETNS | F_STDERR
RESULT, REFUSED, MISMATCH = 0, 1, 2
MAX_ENV = 1 << 20  # bytes of environment JSON
MAX_STDIN = 8 << 20  # bytes of network configuration
MAX_OUT = 8 << 20  # bytes of result
MAX_FDS = 3

DEFAULT_BUDGET = 120.0  # seconds an executor may take to answer one call


def executor_socket(environ: "Mapping[str, str]") -> "Optional[str]":
    """Where the executor listens, or None: run in-process. Node-side settings only, never the
    network config (tenants write that, and the front hands the socket a netns descriptor).

    EHOST_DEVICE_SOCKET: an absolute path; set and empty turns the executor off. Unset: the
    node policy's `executorSocket` (ehost_device.policy), default DEFAULT_SOCKET. The policy
    file is parsed only when it names the key at all: the common case costs one small read.
    """
    path = environ.get("EHOST_DEVICE_SOCKET")
    if path is None:
        path = _policy_socket(environ)
        if path is None:
            return DEFAULT_SOCKET
    if not path:
        return None
    if not path.startswith("/"):
        _warn(f"EHOST_DEVICE_SOCKET={path!r} is not an absolute path; running in-process")
        return None
    return path


def _policy_socket(environ: "Mapping[str, str]") -> "Optional[str]":
    """The node policy's executorSocket ("" = off), or None when the policy does not set it.
    An unusable policy also means in-process ("" ): that path reports the policy's error."""
    where = environ.get("EHOST_DEVICE_POLICY", "/etc/virtdp/ehost-device.yaml")
    try:
        with open(where, "rb") as f:
            if b"executorSocket" not in f.read(1 << 20):
                return None
    except OSError:
        return None  # absent (defaults) or unreadable (in-process reports it)
    from ehost_device import policy
    from virtcore.schema import ConfigError

    try:
        return policy.load(environ).executor_socket
    except ConfigError:
        return ""


def budget(environ: "Mapping[str, str]") -> float:
    """Seconds to wait for the executor's answer (EHOST_DEVICE_TIMEOUT, default 120)."""
    try:
        value = float(environ.get("EHOST_DEVICE_TIMEOUT", "") or DEFAULT_BUDGET)
    except ValueError:
        return DEFAULT_BUDGET
    return value if value > 0 else DEFAULT_BUDGET


def _warn(msg: str) -> None:
    try:
        sys.stderr.write(f"ehost-device: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def trusted(path: str) -> "Optional[str]":
    """Why the socket at `path` must not be used (None: use it). Root's, private, in a
    directory only root can write: anyone else could stand in for the executor and be handed
    the pod's namespace."""
    try:
        st = posix.lstat(path)
    except FileNotFoundError:
        return ""  # no executor: not worth a warning
    except OSError as e:
        return f"cannot stat {path}: {e.strerror}"
    if st.st_mode & 0o170000 != 0o140000:
        return f"{path} is not a socket"
    if st.st_uid != 0 or st.st_mode & 0o077:
        return (
            f"{path} is owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o} (want root, 0600)"
        )
    parent = path.rpartition("/")[0] or "/"
    try:
        pst = posix.stat(parent)
    except OSError as e:
        return f"cannot stat {parent}: {e.strerror}"
    if pst.st_uid != 0 or pst.st_mode & 0o022:
        return (
            f"{parent} is owned by uid {pst.st_uid} with mode {pst.st_mode & 0o777:o} "
            "(want root, writable by root only)"
        )
    return None


def cni_error(data: bytes, code: int, msg: str, details: str) -> bytes:
    """A CNI error as stdout bytes, at the config's cniVersion when it is one we speak."""
    from ehost_device import LATEST, SUPPORTED_VERSIONS

    version = LATEST
    try:
        asked = lean_json.loads(data.decode("utf-8"))
        if isinstance(asked, dict) and asked.get("cniVersion") in SUPPORTED_VERSIONS:
            version = asked["cniVersion"]
    except (UnicodeDecodeError, ValueError):
        pass
    err = {"cniVersion": version, "code": code, "msg": msg, "details": details}
    return (lean_json.dumps(err) + "\n").encode()


def _open_netns(path: str) -> "Tuple[int, int]":
    """(descriptor, 0) or (-1, errno): the executor reports a failure as in-process mode
    would have, from the errno."""
    if not path:
        return -1, 0
    try:
        # O_NONBLOCK: a FIFO named as CNI_NETNS must not hang the call; it is refused later
        # as not a namespace.
        return (
            posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC | posix.O_NONBLOCK | posix.O_NOCTTY),
            0,
        )
    except OSError as e:
        return -1, e.errno or 0


def _relay(sock: _socket.socket, relay_r: int, timeout: float) -> "Tuple[int, int, bytes]":
    """(kind, status, payload) of the executor's answer, relaying the call's stderr meanwhile.
    Raises TimeoutError past `timeout`, EOFError on a cut or malformed answer."""
    import select  # built in (no file to load)

    deadline = _now() + timeout
    buf = b""
    need = RESPONSE.size
    head: Optional[Tuple[bytes, int, int, int, int]] = None
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    if relay_r >= 0:
        poller.register(relay_r, select.POLLIN)
    while True:
        if head is not None and len(buf) >= need:
            break
        left = deadline - _now()
        if left <= 0:
            raise TimeoutError
        for fd, _ in poller.poll(left * 1000):
            if fd == relay_r:
                chunk = posix.read(relay_r, 65536)
                if chunk:
                    write_all(2, chunk)
                else:
                    poller.unregister(relay_r)
                    relay_r = -2  # EOF: the executor is done writing
                continue
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise EOFError
            buf += chunk
            if head is None and len(buf) >= RESPONSE.size:
                head = RESPONSE.unpack(buf[: RESPONSE.size])
                magic, version, kind, _, size = head
                if magic != MAGIC:
                    raise EOFError
                if kind == MISMATCH or version != VERSION:
                    return MISMATCH, 0, b""
                if size > MAX_OUT:
                    raise EOFError
                need = RESPONSE.size + size
    # The answer is whole; the executor closes its end of the relay right after sending it.
    while relay_r >= 0 and _now() < deadline:
        if not poller.poll(min(1.0, deadline - _now()) * 1000):
            break
        chunk = posix.read(relay_r, 65536)
        if not chunk:
            break
        write_all(2, chunk)
    assert head is not None
    return head[2], head[3], buf[RESPONSE.size : need]


def _now() -> float:
    import time  # built in: no import cost

    return time.monotonic()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[posix.write(fd, view) :]
    except OSError:
        pass


def call(
    path: str, environ: "Mapping[str, str]", data: bytes, *, timeout: float = DEFAULT_BUDGET
) -> "Optional[Tuple[int, bytes]]":
    """(exit status, stdout bytes) from the executor, or None: run in-process."""
    why = trusted(path)
    if why is not None:
        if why:
            _warn(f"not using executor socket: {why}; running in-process")
        return None
    env: Dict[str, str] = dict(environ)
    env_b = lean_json.dumps(env).encode("ascii")
    if len(env_b) > MAX_ENV or len(data) > MAX_STDIN:
        return None
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return None
    fds: List[int] = []
    try:
        try:
            sock.connect(path)
        except OSError as e:  # gone, refused, not permitted: the executor is not there for us
            _warn(f"executor at {path} unavailable ({e.strerror}); running in-process")
            return None
        fds.append(posix.open("/proc/self/ns/net", posix.O_RDONLY | posix.O_CLOEXEC))
        flags = 0
        pod_fd, pod_errno = _open_netns(environ.get("CNI_NETNS", ""))
        if pod_fd >= 0:
            fds.append(pod_fd)
            flags |= F_POD_NETNS
        # The executor's log lines and the IPAM plugin's stderr come through a pipe this front
        # relays to its own stderr: never the runtime's stderr itself, which an executor that
        # outlived our patience would otherwise hold open (and the runtime wait for its EOF).
        relay_r = -1
        try:
            posix.fstat(2)
            relay_r, relay_w = posix.pipe2(posix.O_CLOEXEC)
            fds.append(relay_w)
            flags |= F_STDERR
        except OSError:
            pass
        head = REQUEST.pack(MAGIC, VERSION, flags, pod_errno, len(env_b), len(data))
        sock.settimeout(timeout)
        try:
            sock.sendmsg(
                [head],
                [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _struct.pack(f"{len(fds)}i", *fds))],
            )
            for fd in fds:  # the executor has its copies
                posix.close(fd)
            fds = []
            sock.sendall(env_b + data)
            send_error = None
        except OSError as e:
            # It may have answered already (another protocol version, a refusal) and closed
            # without reading the rest: that answer decides; without one, it is 11.
            send_error = e
        not_taken = ("the ehost-device executor did not take the call", f"{path}: {send_error}")
        try:
            reply = _relay(sock, relay_r, timeout if send_error is None else min(timeout, 5.0))
        except TimeoutError:
            return 1, cni_error(
                data,
                11,
                *(
                    not_taken
                    if send_error
                    else (
                        "the ehost-device executor did not answer in time",
                        f"no answer from {path} within {timeout:g}s",
                    )
                ),
            )
        except (EOFError, OSError) as e:
            return 1, cni_error(
                data,
                11,
                *(
                    not_taken
                    if send_error
                    else (
                        "the ehost-device executor went away during the call",
                        f"{path}: connection closed before a whole answer ({type(e).__name__})",
                    )
                ),
            )
        finally:
            if relay_r >= 0:
                posix.close(relay_r)
        kind, status, payload = reply
        if send_error is not None and kind == RESULT:  # cannot be: it had no whole request
            return 1, cni_error(data, 11, *not_taken)
        if kind == MISMATCH:
            return None
        if kind == REFUSED:
            _warn(
                f"executor at {path} refused the call: {payload.decode('utf-8', 'replace')}; "
                "running in-process"
            )
            return None
        return status, payload
    finally:
        for fd in fds:
            posix.close(fd)
        sock.close()
