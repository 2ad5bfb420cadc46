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
