"""virtdp-serve's Prometheus metrics (one registry, module-level objects) and their HTTP port.

Docs are generated from `REGISTRY`: every metric here has a name, help text and labels. The same
port answers `/metrics`, `/healthz` (the process is serving) and `/readyz` (every pool, and the DRA
driver when on, is registered with the kubelet).
"""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

DEVICES = Gauge(
    "virtdp_devices",
    "Devices advertised to the kubelet, per pool (resource) and health.",
    ["resource", "health"],
    registry=REGISTRY,
)
POOL_REGISTERED = Gauge(
    "virtdp_pool_registered",
    "1 while the pool's plugin is registered with the running kubelet, else 0.",
    ["resource"],
    registry=REGISTRY,
)
REGISTRATIONS = Counter(
    "virtdp_registrations",
    "Register calls to the kubelet, by pool and result (ok, refused, unavailable).",
    ["resource", "result"],
    registry=REGISTRY,
)
KUBELET_RESTARTS = Counter(
    "virtdp_kubelet_restarts",
    "Kubelet restarts noticed (kubelet.sock recreated or a plugin socket deleted).",
    registry=REGISTRY,
)
LIST_AND_WATCH_UPDATES = Counter(
    "virtdp_list_and_watch_updates",
    "ListAndWatch device lists sent to the kubelet, per pool (the first list included).",
    ["resource"],
    registry=REGISTRY,
)
ALLOCATIONS = Counter(
    "virtdp_allocations",
    "Allocate container requests answered, by pool and result (ok or the gRPC status code).",
    ["resource", "result"],
    registry=REGISTRY,
)
ALLOCATED_DEVICES = Counter(
    "virtdp_allocated_devices",
    "Devices handed out by successful Allocate calls, per pool.",
    ["resource"],
    registry=REGISTRY,
)
ALLOCATE_SECONDS = Histogram(
    "virtdp_allocate_duration_seconds",
    "Time to answer an Allocate call (validation and device-info files), per pool.",
    ["resource"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=REGISTRY,
)
CONFIG_RELOADS = Counter(
    "virtdp_config_reloads",
    "Pool configuration reloads, by result (applied, unchanged, rejected).",
    ["result"],
    registry=REGISTRY,
)
RESCANS = Counter(
    "virtdp_rescans",
    "Full inventory rescans (every PCI function and link), by reason: start, resync (the "
    "--resync-interval safety net), overflow (an event socket lost events), config (reload), "
    "kubelet (a kubelet restart), route (a default route changed: eligibility).",
    ["reason"],
    registry=REGISTRY,
)
DEVICE_REFRESHES = Counter(
    "virtdp_device_refreshes",
    "PCI functions re-read one at a time after a kernel event concerning them, by event source "
    "(uevent, link, route: a route through its netdev changed).",
    ["source"],
    registry=REGISTRY,
)
EVENT_OVERFLOWS = Counter(
    "virtdp_event_overflows",
    "Kernel event sockets that overflowed (ENOBUFS: events were lost), by socket (uevent, "
    "rtnetlink, inotify); each is followed at once by a full rescan.",
    ["socket"],
    registry=REGISTRY,
)
PREFERRED_IGNORED_IDS = Counter(
    "virtdp_preferred_allocation_ignored_ids",
    "Device IDs in GetPreferredAllocation requests that are not devices of the pool (a briefly "
    "stale list at the kubelet) and were left out of the answer instead of failing it, per pool.",
    ["resource"],
    registry=REGISTRY,
)
DRA_REGISTERED = Gauge(
    "virtdp_dra_registered",
    "1 while the DRA driver is registered with the kubelet (NotifyRegistrationStatus said so), "
    "else 0.",
    registry=REGISTRY,
)
DRA_CLAIMS = Gauge(
    "virtdp_dra_prepared_claims",
    "ResourceClaims prepared on this node (entries of the node-local claim record).",
    registry=REGISTRY,
)
DRA_CLAIM_RESULTS = Counter(
    "virtdp_dra_claims",
    "Claims answered in NodePrepareResources and NodeUnprepareResources calls, by call "
    "(prepare, unprepare) and result (ok, error).",
    ["call", "result"],
    registry=REGISTRY,
)
DRA_PREPARE_SECONDS = Histogram(
    "virtdp_dra_prepare_duration_seconds",
    "Time to answer a NodePrepareResources call (claims read from the API, checked, recorded).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
    registry=REGISTRY,
)
DRA_HEALTH_UPDATES = Counter(
    "virtdp_dra_health_updates",
    "Device health lists sent on NodeWatchResources streams (the first list included).",
    registry=REGISTRY,
)

DRA_SLICE_WRITES = Counter(
    "virtdp_dra_slice_writes",
    "ResourceSlice writes to the API server (DRA), by verb (create, update, delete) and result "
    "(ok, unreachable, or the HTTP status: 409 is a conflict retried at once).",
    ["verb", "result"],
    registry=REGISTRY,
)
DRA_CLAIM_STATUS_WRITES = Counter(
    "virtdp_dra_claim_status_writes",
    "ResourceClaim status updates (status.devices[].networkData) by result (ok, unreachable, or "
    "the HTTP status: 409 is a conflict retried at once, 404 a claim that is gone).",
    ["result"],
    registry=REGISTRY,
)


def forget_pool(resource: str) -> None:
    """Drop the per-pool series of a pool that was removed from the configuration."""
    for health in ("Healthy", "Unhealthy"):
        try:
            DEVICES.remove(resource, health)
        except KeyError:
            pass
    try:
        POOL_REGISTERED.remove(resource)
    except KeyError:
        pass


def parse_address(text: str) -> Tuple[str, int]:
    """`HOST:PORT` (host may be empty or a bracketed IPv6 literal); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:9410 or :9410")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


class MetricsServer:
    """A small threaded HTTP server; `ready()` decides /readyz."""

    def __init__(self, address: str, ready: Callable[[], Tuple[bool, str]]) -> None:
        host, port = parse_address(address)
        ready_fn = ready

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok, why = ready_fn()
                    self._send(200 if ok else 503, (why + "\n").encode())
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics http: " + format, *args)

        server_class = ThreadingHTTPServer
        if ":" in host:

            class Server6(ThreadingHTTPServer):
                address_family = socket.AF_INET6

            server_class = Server6
        self._httpd = server_class((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
