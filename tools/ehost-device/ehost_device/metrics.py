"""The warm executor's Prometheus metrics (prometheus-client), served on `serve
--metrics-address`. Imported by `serve` only: the CNI front and in-process calls never load it.
docs/metrics.md is generated from REGISTRY."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

CALLS = Counter(
    "ehost_device_calls",
    "CNI calls the executor served, by command and result (ok, or error-<CNI code>).",
    ["command", "result"],
    registry=REGISTRY,
)
CALL_SECONDS = Histogram(
    "ehost_device_call_seconds",
    "Time the executor took to serve one CNI call, by command.",
    ["command"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "ehost_device_calls_in_flight", "CNI calls the executor is serving now.", registry=REGISTRY
)
ABANDONED = Counter(
    "ehost_device_calls_abandoned",
    "Calls whose front hung up (killed, or the runtime's budget ran out) before their answer, "
    "by command: an ADD is then not started, rolled back, or undone; a DEL or CHECK finishes.",
    ["command"],
    registry=REGISTRY,
)
REFUSED = Counter(
    "ehost_device_frames_refused",
    "Requests the executor refused, by reason (malformed, oversized or truncated frames, "
    "peers that are not uid 0, fronts in another network namespace).",
    ["reason"],
    registry=REGISTRY,
)


def call_done(command: str, result: str, seconds: float) -> None:
    CALLS.labels(command=command, result=result).inc()
    CALL_SECONDS.labels(command=command).observe(seconds)


def serve(address: str) -> None:
    """Serve REGISTRY at http://ADDRESS/metrics from a daemon thread."""
    from prometheus_client import start_http_server

    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=REGISTRY)
