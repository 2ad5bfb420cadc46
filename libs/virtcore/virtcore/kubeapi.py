"""The Kubernetes API client of the daemon and inspect: the official `kubernetes` client's
ApiClient, built from a kubeconfig file or the pod's ServiceAccount, with timeouts on every call.

Rules this module keeps:
- One place decides where the credentials come from: an explicit kubeconfig path, else the
  in-cluster ServiceAccount (KUBERNETES_SERVICE_HOST/PORT and the mounted token), else an error
  that says both were missing. The kubeconfig is never written back (no token refresh persisted).
- No call without a timeout: `Kube.timeout` is the (connect, read) pair callers pass as
  `_request_timeout`; a watch gets a server-side `timeoutSeconds` and a read timeout above it.
- urllib3 reconnects once at once on a connection error (a dropped keep-alive connection); any
  other retrying (backoff, conflicts) belongs to the caller, who knows what is safe to repeat.
- Importing this module is cheap: the client (~0.4 s of CPU and ~40 MiB, bench/dra_api.py) is
  loaded by `connect()`, so a daemon in device-plugin mode never pays for it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Tuple

from virtcore import __version__

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, ResourceV1Api

# Connect and read timeouts (s) of an ordinary request.
DEFAULT_TIMEOUT: Tuple[float, float] = (5.0, 15.0)
# Server-side duration (s) of one watch request; the client reconnects after it.
WATCH_SECONDS = 300
USER_AGENT = f"virtdp/{__version__}"


class KubeConfigError(Exception):
    """No usable credentials: names the source that was tried and what was wrong."""


@dataclass(frozen=True)
class Kube:
    """An ApiClient and the timeout its callers pass on every request."""

    client: ApiClient
    timeout: Tuple[float, float]
    source: str  # "kubeconfig <path>" or "in-cluster ServiceAccount"

    @property
    def host(self) -> str:
        return str(self.client.configuration.host)

    def resource(self) -> ResourceV1Api:
        from kubernetes.client import ResourceV1Api

        return ResourceV1Api(self.client)

    def get_json(self, resource_path: str, **path_params: str) -> Any:
        """GET one object as JSON through the ApiClient (its auth, TLS and errors: non-2xx
        raises ApiException), for reads whose generated API class is not worth loading:
        CoreV1Api alone costs ~0.4 s of CPU and ~16 MiB to import, for one Node read."""
        from kubernetes.client.exceptions import ApiException

        request = self.client.param_serialize(
            method="GET",
            resource_path=resource_path,
            path_params=path_params,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        resp = self.client.call_api(*request, _request_timeout=self.timeout)
        data = resp.read()
        if not 200 <= resp.status <= 299:
            raise ApiException.from_response(http_resp=resp, body=None, data=None)
        return json.loads(data)

    def watch_timeout(self, seconds: int = WATCH_SECONDS) -> Tuple[float, float]:
        """The `_request_timeout` of a watch asking the server for `seconds`."""
        return (self.timeout[0], float(seconds) + self.timeout[1])

    def close(self) -> None:
        self.client.close()


def connect(
    kubeconfig: Optional[str] = None,
    *,
    context: Optional[str] = None,
    timeout: Tuple[float, float] = DEFAULT_TIMEOUT,
) -> Kube:
    """An ApiClient from `kubeconfig` (a path), else from the in-cluster ServiceAccount."""
    import urllib3  # pants: no-infer-dep (a dependency of kubernetes: BUILD)
    from kubernetes.client import ApiClient, Configuration
    from kubernetes.config import incluster_config, kube_config
    from kubernetes.config.config_exception import ConfigException

    config = Configuration()
    if kubeconfig is not None:
        source = f"kubeconfig {kubeconfig}"
        if not os.path.isfile(kubeconfig):
            raise KubeConfigError(f"{source}: no such file (expected a kubeconfig YAML file)")
        try:
            kube_config.load_kube_config(
                config_file=kubeconfig,
                context=context,
                client_configuration=config,
                persist_config=False,
            )
        except (ConfigException, OSError, ValueError, KeyError, TypeError) as e:
            raise KubeConfigError(f"{source}: {e}") from e
    else:
        source = "in-cluster ServiceAccount"
        if not os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise KubeConfigError(
                "no --kubeconfig given and not running in a pod (KUBERNETES_SERVICE_HOST is "
                "unset): pass --kubeconfig FILE, or run in a pod with a ServiceAccount token"
            )
        try:
            incluster_config.load_incluster_config(client_configuration=config)
        except (ConfigException, OSError) as e:
            raise KubeConfigError(f"{source}: {e}") from e
    config.retries = urllib3.util.Retry(total=1, connect=1, read=0, redirect=0, status=0)
    # That one reconnect is routine (an idle connection the server closed); the caller logs
    # what finally fails.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    client = ApiClient(config)
    client.user_agent = USER_AGENT
    return Kube(client=client, timeout=timeout, source=source)


@dataclass(frozen=True)
class Failure:
    """What a failed request came to: HTTP status (0: no answer), reason and message."""

    status: int
    reason: str
    message: str

    @property
    def unreachable(self) -> bool:
        return self.status == 0

    @property
    def transient(self) -> bool:
        """Worth retrying later unchanged: no answer, overload, or a server-side timeout."""
        return self.status in (0, 429, 500, 502, 503, 504)

    def __str__(self) -> str:
        if self.status == 0:
            return f"API server unreachable: {self.message}"
        return f"{self.status} {self.reason}: {self.message}"


def failure(exc: BaseException) -> Optional[Failure]:
    """The Failure an API call raised, or None when `exc` is not an API/transport error."""
    # Only ever called after a call through the client: these are loaded by then.
    import urllib3  # pants: no-infer-dep (a dependency of kubernetes: BUILD)
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        reason, message = str(exc.reason or ""), ""
        body: Any = exc.body
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        if isinstance(body, str) and body:
            try:
                obj = json.loads(body)
            except ValueError:
                message = body.strip()[:200]
            else:
                if isinstance(obj, dict):
                    reason = str(obj.get("reason") or reason)
                    message = str(obj.get("message") or "")
        return Failure(status, reason, message or reason)
    if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
        return Failure(0, type(exc).__name__, str(exc))
    return None
