"""Registering a device plugin with the kubelet (`/v1beta1.Registration/Register`).

The plugin serves its socket first, then calls Register on `<dir>/kubelet.sock` with the
socket's file name (not its path), the resource name and its options. The kubelet answers only
after it has dialled the plugin back (and asked for its options), so the plugin's server must
already be serving. Failures are RegistrationError (the kubelet refused: bad version, bad name,
could not dial back) or channel.SocketUnavailable (no kubelet there yet); the caller retries.
"""

from __future__ import annotations

import os
from typing import Optional

import grpc

from virtcore.kubelet import channel, deviceplugin_pb2, deviceplugin_pb2_grpc

API_VERSION = "v1beta1"
DEFAULT_DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
KUBELET_SOCKET_NAME = "kubelet.sock"
CHECKPOINT_NAME = "kubelet_internal_checkpoint"
# The kubelet dials the plugin back with a 10 s deadline before it answers Register.
REGISTER_TIMEOUT = 12.0


class RegistrationError(RuntimeError):
    """The kubelet answered Register with an error."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None) -> None:
        super().__init__(message)
        self.code = code


def kubelet_socket(device_plugin_dir: str) -> str:
    return os.path.join(device_plugin_dir, KUBELET_SOCKET_NAME)


def register(
    kubelet_sock: str,
    *,
    endpoint: str,
    resource_name: str,
    options: Optional[deviceplugin_pb2.DevicePluginOptions] = None,
    connect_timeout: float = 1.0,
    timeout: float = REGISTER_TIMEOUT,
) -> None:
    """Register one plugin endpoint. `endpoint` is the socket's name inside the kubelet's dir."""
    if not endpoint or os.sep in endpoint:
        raise ValueError(
            f"endpoint {endpoint!r}: expected a socket file name inside the device-plugins "
            "directory, without a directory part"
        )
    chan = channel.connect(kubelet_sock, timeout=connect_timeout)
    try:
        stub = deviceplugin_pb2_grpc.RegistrationStub(chan)
        request = deviceplugin_pb2.RegisterRequest(
            version=API_VERSION,
            endpoint=endpoint,
            resource_name=resource_name,
            options=options or deviceplugin_pb2.DevicePluginOptions(),
        )
        try:
            stub.Register(request, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            if code == grpc.StatusCode.UNAVAILABLE:
                raise channel.SocketUnavailable(f"{kubelet_sock}: {details}") from None
            raise RegistrationError(
                f"kubelet at {kubelet_sock} refused {resource_name} (endpoint {endpoint}): "
                f"{code.name if code else 'error'}: {details}",
                code,
            ) from None
    finally:
        chan.close()
