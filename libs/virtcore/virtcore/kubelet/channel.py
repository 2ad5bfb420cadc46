"""gRPC channels to the kubelet's and the device plugins' unix sockets.

The kubelet speaks gRPC over unix sockets with no authority; grpcio wants the target as
`unix:///abs/path`. Every caller gets a deadline: a socket that accepts and then hangs must not
hang a CLI or the daemon.
"""

from __future__ import annotations

import os

import grpc

DEFAULT_TIMEOUT = 5.0


class SocketUnavailable(ConnectionError):
    """The socket is absent, refuses, or did not become ready in time."""


def target(socket_path: str) -> str:
    return "unix://" + os.path.abspath(socket_path)


def unix_channel(socket_path: str) -> grpc.Channel:
    """An insecure channel to a unix socket (not yet connected)."""
    return grpc.insecure_channel(
        target(socket_path),
        options=[
            # One dial attempt per call: the caller owns retries and backoff.
            ("grpc.enable_retries", 0),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ],
    )


def connect(socket_path: str, timeout: float = DEFAULT_TIMEOUT) -> grpc.Channel:
    """A channel that is ready, or SocketUnavailable naming the socket and what to check."""
    if not os.path.exists(socket_path):
        raise SocketUnavailable(f"{socket_path}: no such socket")
    channel = unix_channel(socket_path)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        channel.close()
        raise SocketUnavailable(
            f"{socket_path}: did not accept a gRPC connection within {timeout:g}s "
            "(is the server running and speaking gRPC?)"
        ) from None
    return channel


# The HTTP/2 client connection preface followed by an empty SETTINGS frame. Every HTTP/2 (so
# every gRPC) server answers a new connection with its own SETTINGS frame (RFC 9113, 3.4).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_FRAME_SETTINGS = 0x4


def probe(socket_path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Check, without gRPC, that `socket_path` is a socket with an HTTP/2 server behind it.

    Raises SocketUnavailable with one line saying what is wrong: absent, not a socket, refusing,
    closing without a word, answering something that is not HTTP/2, or accepting and then
    staying silent past `timeout`. gRPC alone reports all of these as one slow timeout.
    """
    import errno
    import socket
    import stat

    try:
        st = os.stat(socket_path)
    except FileNotFoundError:
        raise SocketUnavailable(f"{socket_path}: no such socket") from None
    except OSError as e:
        raise SocketUnavailable(f"{socket_path}: cannot stat: {e.strerror or e}") from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a regular file"
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            kind = "not a regular file"
        raise SocketUnavailable(f"{socket_path}: is {kind}, not a unix socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(socket_path)
        except ConnectionRefusedError:
            raise SocketUnavailable(
                f"{socket_path}: connection refused (nobody is listening: a stale socket file?)"
            ) from None
        except socket.timeout:
            raise SocketUnavailable(
                f"{socket_path}: connect did not complete within {timeout:g}s (server hung?)"
            ) from None
        except OSError as e:
            if e.errno == errno.EACCES:
                raise SocketUnavailable(
                    f"{socket_path}: permission denied (run as root?)"
                ) from None
            raise SocketUnavailable(f"{socket_path}: cannot connect: {e.strerror or e}") from None
        try:
            sock.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except socket.timeout:
            raise SocketUnavailable(
                f"{socket_path}: accepted the connection but sent nothing within {timeout:g}s "
                "(server hung, or not a gRPC server?)"
            ) from None
        except OSError as e:
            raise SocketUnavailable(
                f"{socket_path}: connection failed: {e.strerror or e} (not a gRPC server?)"
            ) from None
        if not head:
            raise SocketUnavailable(
                f"{socket_path}: closed the connection without answering (not a gRPC server?)"
            )
        if len(head) < 9 or head[3] != _H2_FRAME_SETTINGS:
            sock.settimeout(min(timeout, 0.2))
            try:
                head += sock.recv(64)  # a little more, to show what it speaks instead
            except OSError:
                pass
            first = head.split(b"\r\n", 1)[0][:48]
            raise SocketUnavailable(
                f"{socket_path}: answered {first!r}, not HTTP/2 (not a gRPC server)"
            )
    finally:
        sock.close()
