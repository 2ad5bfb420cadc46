"""Claim device status: copies what ehost-device records on the node after plumbing a claimed
NIC (`<dra-state-dir>/status/<claim uid>_<device>.json`, virtcore.claims) into the claim's
`status.devices[]` entry through the API's status subresource, and removes the entry when the
file goes (CNI DEL).

- Event-driven: an inotify watch on the status directory marks the claim a file belongs to;
  nothing is polled. At start every claim with a file, and every claim `prepared()` names (files
  may have gone while the daemon was down), is reconciled once.
- An entry is `{driver, pool, device, networkData: {interfaceName, ips, hardwareAddress}}`.
  Entries are owned by their driver (the API's rule): only this driver's are written, the
  others are kept as read. An entry is only written for a device the claim's allocation gives
  this driver (the API refuses others: 422), and ips are sent in canonical CIDR form.
- The write is a JSON merge patch of `status.devices` (the whole list, as merge patches do with
  lists) carrying `metadata.resourceVersion` as a precondition: a claim changed since it was read
  answers 409 and is read and patched again at once. A claim that is gone (404) or that is
  another object of the same name (other UID) is left alone. No answer or 5xx -> the claim
  stays marked and is retried with exponential backoff.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import select
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from virtcore import claims, inotify, kubeapi
from virtdp_serve import metrics

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.5  # s
BACKOFF_MAX = 10.0  # s
# A JSON merge patch with resourceVersion: replaces status.devices, fails on a concurrent change.
MERGE_PATCH = "application/merge-patch+json"

Obj = Dict[str, Any]
ClaimRef = Tuple[str, str, str]  # (uid, namespace, name)


def canonical_ip(cidr: str) -> str:
    """An interface address as the API wants it ("2001:DB8::2/64" -> "2001:db8::2/64")."""
    iface = ipaddress.ip_interface(cidr)
    return f"{iface.ip}/{iface.network.prefixlen}"


def entry(status: claims.DeviceStatus) -> Obj:
    """The claim's status.devices[] entry for one status file."""
    return {
        "driver": status.driver,
        "pool": status.pool,
        "device": status.device,
        "networkData": {
            "interfaceName": status.interface_name,
            "ips": [canonical_ip(ip) for ip in status.ips],
            "hardwareAddress": status.hardware_address,
        },
    }


def _comparable(e: Obj) -> Obj:
    """An entry without what the server adds (`conditions: null`) and without empty keys."""
    return {k: v for k, v in e.items() if v not in (None, [], {}) or k == "networkData"}


class StatusWriter:
    """One thread (`claim-status`): inotify on the status directory, and the API writes."""

    def __init__(
        self,
        kube: kubeapi.Kube,
        *,
        driver: str,
        state_dir: str = claims.DEFAULT_DIR,
        prepared: Callable[[], Iterable[ClaimRef]] = lambda: (),
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.kube = kube
        self.driver = driver
        self.state_dir = state_dir
        self.status_dir = claims.status_dir(state_dir)
        self.prepared = prepared
        self.backoff_max = backoff_max
        self._names: Dict[str, Tuple[str, str]] = {}  # claim uid -> (namespace, name)
        self._dirty: Set[str] = set()
        self._retry: Dict[str, Tuple[float, float]] = {}  # uid -> (when, delay)
        self._lock = threading.Condition()
        self._stop_r, self._stop_w = os.pipe()
        self._thread: Optional[threading.Thread] = None
        self._inotify: Optional[inotify.Inotify] = None
        self.writes = 0
        self.last_error: Optional[str] = None
        self._idle = True

    # -- the daemon's side -----------------------------------------------------------------
    def start(self) -> None:
        os.makedirs(self.status_dir, mode=claims.DIR_MODE, exist_ok=True)
        self._inotify = inotify.Inotify()
        self._inotify.watch(self.status_dir)  # before the first read: no change is missed
        with self._lock:
            for uid, ns, name in self.prepared():
                self._names[uid] = (ns, name)
                self._dirty.add(uid)
            self._dirty.update(self._scan())
            self._idle = not self._dirty
        self._thread = threading.Thread(target=self._loop, name="claim-status", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (entries stay as written). Idempotent."""
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(timeout)
            self._thread = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    def claim_changed(self, uid: str, namespace: str, name: str) -> None:
        """Look at this claim again (e.g. the daemon prepared or unprepared it)."""
        with self._lock:
            self._names[uid] = (namespace, name)
            self._dirty.add(uid)
            self._idle = False
        os.write(self._stop_w, b"w")

    def wait_idle(self, timeout: float) -> bool:
        """Until every marked claim was written (tests, bench)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._idle, timeout)

    # -- the thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        assert self._inotify is not None
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            self._work()
            with self._lock:
                timeout_ms = None
                if self._retry:
                    wait = min(when for when, _ in self._retry.values()) - time.monotonic()
                    timeout_ms = max(0, int(wait * 1000))
            ready = [fd for fd, _ in poller.poll(timeout_ms)]
            if self._stop_r in ready:
                data = os.read(self._stop_r, 64)
                if b"x" in data:
                    return
            if self._inotify.fileno() in ready:
                self._on_events(self._inotify.read())

    def _on_events(self, events: List[inotify.Event]) -> None:
        marked: Set[str] = set()
        for ev in events:
            if ev.overflow or ev.mask & (inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF):
                # Lost events, or the directory itself replaced: look at everything.
                marked |= self._scan() | set(self._names)
                if ev.mask & (inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF):
                    os.makedirs(self.status_dir, mode=claims.DIR_MODE, exist_ok=True)
                    assert self._inotify is not None
                    self._inotify.watch(self.status_dir)
                continue
            key = claims.status_key(ev.name)
            if key is not None:
                marked.add(key[0])
        if marked:
            with self._lock:
                self._dirty |= marked
                self._idle = False

    def _scan(self) -> Set[str]:
        try:
            names = os.listdir(self.status_dir)
        except FileNotFoundError:
            return set()
        return {k[0] for k in map(claims.status_key, names) if k is not None}

    def _work(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = {u for u, (when, _) in self._retry.items() if when <= now}
            todo = sorted(self._dirty | due)
            self._dirty.clear()
        for uid in todo:
            try:
                self._sync(uid)
            except Exception as e:  # noqa: BLE001 - keep the claim marked, retry later
                f = kubeapi.failure(e)
                message = str(f) if f is not None else f"{type(e).__name__}: {e}"
                with self._lock:
                    delay = self._retry.get(uid, (0.0, BACKOFF_MIN / 2))[1] * 2
                    delay = min(max(delay, BACKOFF_MIN), self.backoff_max)
                    self._retry[uid] = (time.monotonic() + delay * random.uniform(0.8, 1.2), delay)
                    self.last_error = f"claim {uid}: {message}"
                log.warning(
                    "claim %s: status not written (%s); again in %.1fs", uid, message, delay
                )
            else:
                with self._lock:
                    self._retry.pop(uid, None)
        with self._lock:
            self._idle = not self._dirty and not self._retry
            self._lock.notify_all()

    def _statuses(self, uid: str) -> List[claims.DeviceStatus]:
        out = []
        try:
            names = sorted(os.listdir(self.status_dir))
        except FileNotFoundError:
            return []
        for name in names:
            key = claims.status_key(name)
            if key is None or key[0] != uid:
                continue
            try:
                status = claims.read_status(os.path.join(self.status_dir, name))
            except FileNotFoundError:
                continue  # removed meanwhile: its DEL is the next event
            except claims.ClaimRecordError as e:
                log.error("ignoring a status file: %s", e)
                continue
            if status.driver != self.driver:
                log.error("ignoring %s: driver %r, expected %r", name, status.driver, self.driver)
                continue
            out.append(status)
        return out

    def _sync(self, uid: str) -> None:
        """Make the claim's entries of this driver equal to its status files."""
        statuses = self._statuses(uid)
        with self._lock:
            if statuses:
                self._names[uid] = (statuses[0].claim_namespace, statuses[0].claim_name)
            ref = self._names.get(uid)
        if ref is None:
            return  # never seen with a namespace and name: nothing of ours can be there
        namespace, name = ref
        # Any: with _preload_content=False the calls return the raw urllib3 response.
        api: Any = self.kube.resource()
        for _ in range(10):
            try:
                resp = api.read_namespaced_resource_claim(
                    name, namespace, _preload_content=False, _request_timeout=self.kube.timeout
                )
            except Exception as e:
                f = kubeapi.failure(e)
                if f is not None and f.status == 404:
                    log.info("claim %s/%s is gone: its status is not written", namespace, name)
                    self._forget(uid, statuses)
                    return
                raise
            claim = json.loads(resp.data)
            meta = claim.get("metadata") or {}
            if meta.get("uid") != uid:
                log.info(
                    "claim %s/%s is now another object (uid %s, not %s): leaving it alone",
                    namespace,
                    name,
                    meta.get("uid"),
                    uid,
                )
                self._forget(uid, statuses)
                return
            status = claim.get("status") or {}
            allocated = {
                (r.get("driver"), r.get("pool"), r.get("device"))
                for r in ((status.get("allocation") or {}).get("devices") or {}).get("results")
                or []
            }
            ours: List[Obj] = []
            for s in statuses:
                if (s.driver, s.pool, s.device) in allocated:
                    ours.append(entry(s))
                else:
                    log.warning(
                        "claim %s/%s: %s/%s/%s is not allocated to it (any more): not reported",
                        namespace,
                        name,
                        s.driver,
                        s.pool,
                        s.device,
                    )
            current = status.get("devices") or []
            others = [e for e in current if e.get("driver") != self.driver]
            mine = [_comparable(e) for e in current if e.get("driver") == self.driver]
            if sorted(map(_key, mine)) == sorted(map(_key, ours)) and _same(mine, ours):
                return
            devices = others + sorted(ours, key=lambda e: e["device"])
            patch = {
                "metadata": {"resourceVersion": meta.get("resourceVersion")},
                "status": {"devices": devices or None},
            }
            try:
                api.patch_namespaced_resource_claim_status(
                    name,
                    namespace,
                    patch,
                    _content_type=MERGE_PATCH,
                    _preload_content=False,
                    _request_timeout=self.kube.timeout,
                )
            except Exception as e:
                f = kubeapi.failure(e)
                metrics.DRA_CLAIM_STATUS_WRITES.labels(_result(f)).inc()
                if f is not None and f.status == 409:
                    continue  # changed since read: read again
                if f is not None and f.status == 404:
                    self._forget(uid, statuses)
                    return
                raise
            metrics.DRA_CLAIM_STATUS_WRITES.labels("ok").inc()
            with self._lock:
                self.writes += 1
                self.last_error = None
            log.info(
                "claim %s/%s: status.devices of %s now %s",
                namespace,
                name,
                self.driver,
                [e["device"] for e in ours] or "none",
            )
            if not statuses:
                self._forget(uid, statuses)
            return
        raise RuntimeError(f"claim {namespace}/{name} kept changing under every attempt")

    def _forget(self, uid: str, statuses: List[claims.DeviceStatus]) -> None:
        if not statuses:
            with self._lock:
                self._names.pop(uid, None)


def _key(e: Obj) -> Tuple[str, str, str]:
    return (str(e.get("driver")), str(e.get("pool")), str(e.get("device")))


def _same(a: List[Obj], b: List[Obj]) -> bool:
    by_key = {_key(e): _comparable(e) for e in a}
    return all(by_key.get(_key(e)) == _comparable(e) for e in b)


def _result(f: Optional[kubeapi.Failure]) -> str:
    if f is None:
        return "error"
    return "unreachable" if f.unreachable else str(f.status)
