"""Registering a device plugin with the kubelet (`/v1beta1.Registration/Register`).

The plugin serves its socket first, then calls Register on `<dir>/kubelet.sock` with the
socket's file name (not its path), the resource name and its options. The kubelet answers only
after it has dialled the plugin back (and asked for its options), so the plugin's server must
already be serving. Failures are RegistrationError (the kubelet refused: bad version, bad name,
could not dial back) or channel.SocketUnavailable (no kubelet there yet); the caller retries.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import grpc

from virtcore.kubelet import channel, deviceplugin_pb2, deviceplugin_pb2_grpc

API_VERSION = "v1beta1"
DEFAULT_DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
KUBELET_SOCKET_NAME = "kubelet.sock"
CHECKPOINT_NAME = "kubelet_internal_checkpoint"
# The kubelet dials the plugin back with a 10 s deadline before it answers Register.
REGISTER_TIMEOUT = 12.0


# k8s.io/apimachinery validation, anchored at the very end of the text as Go's regexps are.
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
EXPECTED_RESOURCE_NAME = (
    "<domain>/<name>: a lower-case DNS domain of at most 244 characters that does not contain "
    "'kubernetes.io/', and a name of at most 63 letters, digits, '-', '_' or '.'"
)


def resource_name_problem(name: str) -> Optional[str]:
    """Why the kubelet's Register would refuse `name` (v1helper.IsExtendedResourceName), or
    None. The kubelet checks "requests.<name>" as a qualified name, so the domain may have at
    most 253 - len("requests.") characters."""
    if "/" not in name:
        return f"{name!r} has no domain part"
    if "kubernetes.io/" in name:
        return f"{name!r} is in the kubernetes.io namespace, which is reserved"
    if name.startswith("requests."):
        return f"{name!r} starts with 'requests.', which is reserved for quota"
    prefix, _, short = ("requests." + name).partition("/")
    if "/" in short:
        return f"{name!r} has more than one '/'"
    if len(prefix) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(prefix):
        return f"domain {name.partition('/')[0]!r} is not a DNS subdomain of at most 244 characters"
    if not 0 < len(short) <= 63 or not _QUALIFIED_NAME.fullmatch(short):
        return f"name {short!r} is not 1-63 letters, digits, '-', '_' or '.' (alphanumeric ends)"
    return None


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
