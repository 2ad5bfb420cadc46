"""This node's DRA ResourceSlices: one pool named after the node, one device per NIC the
inventory offers to DRA, kept current through the API server.

Shape of what is published (resource.k8s.io/v1):
- Pool `<node>`, `spec.nodeName: <node>`, `spec.driver: <driver>`, ownerReference to the Node
  (controller, so the garbage collector removes the slices with a deleted Node). Devices sorted
  by name, SLICE_DEVICES (64) per slice: a device taint lowers the API's limit from 128 to 64
  devices per slice, and a NIC losing its carrier must not move devices between slices.
- Device `pci-<address>` (claims.device_name) with the attributes `pciAddress`, `numaNode`,
  `macAddress`, `ifName`, `pool`, `vendorID`, `deviceID` (driver domain), the standard
  `resource.kubernetes.io/pciBusID` and, where sysfs gives it, `resource.kubernetes.io/pcieRoot`.
- Taints (effect NoSchedule): `<driver>/no-carrier` on a NIC the inventory holds unhealthy
  (carrier lost while admin-up), `<driver>/no-netdev` on a NIC whose netdev is not in the node's
  namespace although no prepared claim holds it. Each keeps the time it was first seen. An
  API server that drops taints (Kubernetes 1.34/1.35, feature gate DRADeviceTaints off by
  default) makes the publisher leave such NICs out of the slices instead.

How it stays current, with no polling:
- `update(devices, in_use=...)` (the daemon, after inventory changes) records what should be
  published and wakes the writer thread, which waits COALESCE seconds so that a burst of events
  becomes one write.
- A watcher thread lists this node's slices of this driver (field selector spec.nodeName and
  spec.driver) and then watches them (bookmarks on, 410 Gone -> list again), keeping a cache.
  Every event wakes the writer, which compares the cache with what should be there: an edit or
  delete by anyone else is repaired, our own writes compare equal and cost nothing more.
- A write that changes anything bumps the pool generation in every slice of the pool (the API's
  rule: consumers use the highest generation and wait for resourceSliceCount slices of it).
  Updates carry the cached resourceVersion: a 409 (someone wrote in between) re-reads that
  slice and tries again; a 404 drops it from the cache (it is created again); unreachable or
  overloaded API -> retry with exponential backoff (BACKOFF_MIN..backoff_max, jittered); the
  watcher lists again when the API is back. A 422 (the API refuses what we send) is logged and
  retried at the slowest backoff.

On shutdown nothing is deleted. The kubelet's DRA plugin manager owns that: when a driver's
plugin unregisters (its socket goes) it deletes the driver's slices of the node with a
DeleteCollection (field selector spec.nodeName + spec.driver) after a 30 s grace period, and it
cancels that when the plugin registers again (kubelet pkg/kubelet/cm/dra/plugin/
dra_plugin_manager.go, defaultWipingDelay in cm/dra/manager.go); at its own start it wipes all of
the node's slices. A daemon restart within 30 s therefore keeps its slices (no flapping), and
the watcher here republishes whatever the kubelet wiped.
"""

from __future__ import annotations

import datetime
import json
import logging
import random
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from virtcore import kubeapi
from virtdp_serve import metrics
from virtdp_serve.inventory import DraDevice

log = logging.getLogger(__name__)

DEFAULT_DRIVER = "virt.kernel.org"
SLICE_DEVICES = 64  # ResourceSliceMaxDevicesWithAdvancedFeatures (a taint makes it apply)
COALESCE = 0.02  # s: events closer than this become one write
BACKOFF_MIN = 0.5  # s
BACKOFF_MAX = 10.0  # s
PCIE_ROOT = "resource.kubernetes.io/pcieRoot"
PCI_BUS_ID = "resource.kubernetes.io/pciBusID"

Obj = Dict[str, Any]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class _Remembered:
    """What the node cannot tell about a NIC while its netdev is inside a pod."""

    ifname: Optional[str]
    mac: Optional[str]


class DesiredState:
    """Turns DRA devices into API Device objects; remembers what must stay stable from one
    publication to the next (a taint's timeAdded, a NIC's host name and MAC while in a pod)."""

    def __init__(self, driver: str) -> None:
        self.driver = driver
        self.taint_times: Dict[Tuple[str, str], str] = {}  # (device, key) -> timeAdded
        self.remembered: Dict[str, _Remembered] = {}  # device name -> host name, MAC

    def adopt(self, slices: Iterable[Obj]) -> None:
        """Take over taint times, host names and MACs from slices published before (by this
        daemon before a restart): republishing the same NICs then changes nothing."""
        for s in slices:
            for dev in (s.get("spec") or {}).get("devices") or []:
                name = dev.get("name")
                for t in dev.get("taints") or []:
                    if t.get("timeAdded"):
                        self.taint_times.setdefault((name, t.get("key")), t["timeAdded"])
                attrs = dev.get("attributes") or {}
                ifname = (attrs.get("ifName") or {}).get("string")
                mac = (attrs.get("macAddress") or {}).get("string")
                if name not in self.remembered and (ifname or mac):
                    self.remembered[name] = _Remembered(ifname, mac)

    def devices(self, devices: Iterable[DraDevice], *, taints: bool = True) -> List[Obj]:
        """The API Device objects, by name. `taints` False (the API server drops them): a NIC
        with a problem is left out instead, so that nothing schedules onto it."""
        ordered = sorted(devices, key=lambda d: d.name)
        out = [self.device(d) for d in ordered if taints or d.problem is None]
        live = {(e["name"], t["key"]) for e in out for t in e.get("taints", ())}
        # A taint that went away starts a new time when it comes back.
        for key in [k for k in self.taint_times if k not in live]:
            del self.taint_times[key]
        return out

    def device(self, dev: DraDevice) -> Obj:
        if dev.ifname or dev.mac:
            self.remembered[dev.name] = _Remembered(dev.ifname, dev.mac)
        known = self.remembered.get(dev.name, _Remembered(None, None))
        attrs: Obj = {
            "pciAddress": {"string": dev.pci_address},
            PCI_BUS_ID: {"string": dev.pci_address},
            "pool": {"string": dev.pool},
        }
        if dev.numa_node is not None:
            attrs["numaNode"] = {"int": dev.numa_node}
        for key, value in (
            ("macAddress", dev.mac or known.mac),
            ("ifName", dev.ifname or known.ifname),
            ("vendorID", dev.vendor),
            ("deviceID", dev.device_id),
            (PCIE_ROOT, dev.pcie_root),
        ):
            if value:
                attrs[key] = {"string": value}
        entry: Obj = {"name": dev.name, "attributes": attrs}
        if dev.problem is not None:
            key = f"{self.driver}/{dev.problem}"
            entry["taints"] = [
                {
                    "key": key,
                    "effect": "NoSchedule",
                    "timeAdded": self.taint_times.setdefault((dev.name, key), _now()),
                }
            ]
        return entry


def chunks(entries: List[Obj], size: int = SLICE_DEVICES) -> List[List[Obj]]:
    """Devices split into slices; an empty pool is one empty slice (the driver is up, with no
    devices: "empty pool" is not "no pool")."""
    return [entries[i : i + size] for i in range(0, len(entries), size)] or [[]]


def _rv(obj: Obj) -> int:
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return -1


class _Retry(Exception):
    """Reconcile again at once: the cache was corrected (a conflict, a vanished slice)."""


class _Relist(Exception):
    """The watch expired (410 Gone): list again."""


class Publisher:
    """Keeps this node's ResourceSlices equal to the devices last given to `update()`.

    Threads: `slices-watch` (list, then watch, into the cache) and `slices-write` (compare and
    write). `update()` only records the list and wakes the writer: it never waits for the API.
    """

    def __init__(
        self,
        kube: kubeapi.Kube,
        *,
        node: str,
        driver: str = DEFAULT_DRIVER,
        slice_devices: int = SLICE_DEVICES,
        coalesce: float = COALESCE,
        backoff_max: float = BACKOFF_MAX,
        watch_seconds: int = kubeapi.WATCH_SECONDS,
    ) -> None:
        self.kube = kube
        self.node = node
        self.driver = driver
        self.slice_devices = slice_devices
        self.coalesce = coalesce
        self.backoff_max = backoff_max
        self.watch_seconds = watch_seconds
        self.selector = f"spec.nodeName={node},spec.driver={driver}"
        self._desired = DesiredState(driver)
        self._cond = threading.Condition()
        self._devices: Optional[Tuple[DraDevice, ...]] = None  # None: no update() yet
        self._cache: Dict[str, Obj] = {}  # our slices by name, as the API last showed them
        self._synced = False  # the cache follows the API (listed, watch running)
        self._dirty = False  # something may differ: the writer has to look
        self._stopping = False
        self._node_uid: Optional[str] = None
        self._pending: Optional[Tuple[List[List[Obj]], int]] = None  # (slices, generation)
        self._watch_response: Any = None
        self._threads: List[threading.Thread] = []
        # What the writer last achieved (readiness, tests, bench).
        self.generation = 0
        self.taints_supported: Optional[bool] = None  # unknown until a tainted device is sent
        self.in_sync = False
        self.last_error: Optional[str] = None
        self.writes = 0

    # -- the daemon's side -----------------------------------------------------------------
    def start(self) -> None:
        for name, target in (
            ("slices-watch", self._watch_loop),
            ("slices-write", self._write_loop),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def update(self, devices: Sequence[DraDevice]) -> None:
        """What to publish: the NICs offered through DRA (inventory.dra_device). The latest
        list wins; an unchanged list costs a tuple comparison."""
        snapshot = tuple(devices)
        with self._cond:
            if snapshot == self._devices:
                return
            self._devices = snapshot
            self._dirty = True
            self._cond.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both threads; the slices stay (see the module docstring). Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        resp = self._watch_response
        if resp is not None:
            try:
                resp.shutdown()  # unblocks the watcher's read
            except Exception:  # noqa: BLE001 - best effort; the thread is a daemon
                pass
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    def wait_in_sync(self, timeout: float) -> bool:
        """Until the API shows exactly what the last update() asked for."""
        with self._cond:
            return self._cond.wait_for(lambda: self.in_sync and not self._dirty, timeout)

    def state(self) -> Obj:
        with self._cond:
            return {
                "synced": self._synced,
                "in_sync": self.in_sync and not self._dirty,
                "generation": self.generation,
                "slices": len(self._cache),
                "devices": len(self._devices or ()),
                "writes": self.writes,
                "last_error": self.last_error,
            }

    # -- watcher ---------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        # Any: with _preload_content=False the calls return the raw urllib3 response.
        api: Any = self.kube.resource()
        delay = BACKOFF_MIN
        first = True
        while not self._stopping:
            try:
                resp = api.list_resource_slice(
                    field_selector=self.selector,
                    _preload_content=False,
                    _request_timeout=self.kube.timeout,
                )
                doc = json.loads(resp.data)
                rv = str(doc["metadata"]["resourceVersion"])
                with self._cond:
                    self._cache = {o["metadata"]["name"]: o for o in doc.get("items") or []}
                    if first:
                        self._desired.adopt(self._cache.values())
                        first = False
                    self._synced = True
                    self._dirty = True
                    self._cond.notify_all()
                delay = BACKOFF_MIN
                while not self._stopping:
                    rv = self._watch_once(api, rv)
            except _Relist:
                continue
            except Exception as e:  # noqa: BLE001 - any failure: list again after a pause
                if self._stopping:
                    break
                f = kubeapi.failure(e)
                log.warning(
                    "watching ResourceSlices failed (%s); listing again in %.1fs", f or e, delay
                )
                with self._cond:
                    self._synced = False
                    self.in_sync = False
                    self.last_error = f"watch: {f or e}"
                    self._cond.wait_for(lambda: self._stopping, delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.backoff_max)

    def _watch_once(self, api: Any, rv: str) -> str:
        """One watch request from `rv` until the server ends it; the version to go on from."""
        from kubernetes.watch.watch import iter_resp_lines

        resp = api.list_resource_slice(
            field_selector=self.selector,
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_seconds,
            _preload_content=False,
            _request_timeout=self.kube.watch_timeout(self.watch_seconds),
        )
        self._watch_response = resp
        try:
            for line in iter_resp_lines(resp):
                if not line:
                    continue
                event = json.loads(line)
                etype, obj = event.get("type"), event.get("object") or {}
                if etype == "ERROR":
                    if obj.get("code") == 410:
                        log.info(
                            "ResourceSlice watch expired (%s): listing again", obj.get("message")
                        )
                        raise _Relist()
                    raise RuntimeError(f"watch error: {obj.get('message') or obj}")
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if new_rv:
                    rv = str(new_rv)
                if etype != "BOOKMARK":
                    self._apply_event(etype, obj)
        finally:
            self._watch_response = None
            resp.release_conn()
        return rv

    def _apply_event(self, etype: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        with self._cond:
            cached = self._cache.get(name)
            if cached is not None and _rv(obj) < _rv(cached):
                return  # older than what one of our writes already returned
            if etype == "DELETED":
                self._cache.pop(name, None)
            else:
                self._cache[name] = obj
            self._dirty = True
            self._cond.notify_all()

    # -- writer ----------------------------------------------------------------------------
    def _write_loop(self) -> None:
        delay = BACKOFF_MIN
        pause: Optional[float] = None  # after a failure: wait this long, then try again
        while True:
            with self._cond:
                if pause is not None:
                    self._cond.wait_for(lambda: self._stopping, pause)
                    pause = None
                self._cond.wait_for(
                    lambda: self._stopping
                    or (self._dirty and self._synced and self._devices is not None)
                )
                if self._stopping:
                    return
                # Let a burst of events settle into one write.
                self._cond.wait_for(lambda: self._stopping, self.coalesce)
                if self._stopping:
                    return
                self._dirty = False
            try:
                for _ in range(10):
                    try:
                        self._reconcile()
                        break
                    except _Retry:
                        continue
                else:
                    raise RuntimeError("the slices kept changing under every attempt")
            except Exception as e:  # noqa: BLE001 - the writer must not die
                f = kubeapi.failure(e)
                refused = f is not None and f.status in (400, 403, 422)
                message = str(f) if f is not None else f"{type(e).__name__}: {e}"
                if refused:
                    delay = self.backoff_max
                    log.error("the API server refuses our ResourceSlices: %s", message)
                else:
                    log.warning(
                        "publishing ResourceSlices failed (%s); again in %.1fs", message, delay
                    )
                with self._cond:
                    self.last_error = message
                    self.in_sync = False
                    self._dirty = True
                    self._cond.notify_all()
                pause = delay * random.uniform(0.8, 1.2)
                delay = min(delay * 2, self.backoff_max)
            else:
                delay = BACKOFF_MIN

    def _owner(self, *, fresh: bool) -> Obj:
        """The Node as ownerReference (controller): the garbage collector deletes the slices
        with the Node. `fresh`: read its UID again (the Node may have been re-created)."""
        if fresh or self._node_uid is None:
            node = self.kube.get_json("/api/v1/nodes/{name}", name=self.node)
            self._node_uid = str(node["metadata"]["uid"])
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "name": self.node,
            "uid": self._node_uid,
            "controller": True,
        }

    def _reconcile(self) -> None:
        with self._cond:
            entries = self._desired.devices(
                self._devices or (), taints=self.taints_supported is not False
            )
            current = sorted(self._cache.values(), key=_slice_order)
        want = chunks(entries, self.slice_devices)
        generation = max((_generation(s) for s in current), default=0)
        if self._node_uid is not None and self._matches(
            current, want, generation, self._owner(fresh=False)
        ):
            self._done(generation, None)
            return
        owner = self._owner(fresh=True)
        if self._matches(current, want, generation, owner):
            self._done(generation, None)
            return
        # One change, one new generation: retrying the same change keeps the generation it
        # chose (the slices it already wrote carry it).
        if (
            self._pending is not None
            and self._pending[0] == want
            and self._pending[1] >= generation
        ):
            target = self._pending[1]
        else:
            # Never back to a generation used before (after someone deleted every slice):
            # consumers may still hold slices of it.
            target = max(generation, self.generation) + 1
        self._pending = (want, target)
        pool = {"name": self.node, "generation": target, "resourceSliceCount": len(want)}
        # Any: with _preload_content=False the calls return the raw urllib3 response.
        api: Any = self.kube.resource()
        # Obsolete slices first, as upstream's controller does: NICs that are gone stop being
        # offered even if writing the others fails.
        for extra in current[len(want) :]:
            self._delete(api, extra)
        for i, devices in enumerate(want):
            spec = {"driver": self.driver, "nodeName": self.node, "pool": pool, "devices": devices}
            if i < len(current):
                old = current[i]
                if old.get("spec") == spec and _owned(old, owner):
                    continue
                meta = dict(old["metadata"], ownerReferences=[owner])
                self._write(api, "update", {**_TYPE, "metadata": meta, "spec": spec})
            else:
                meta = {"generateName": f"{self.node}-{self.driver}-", "ownerReferences": [owner]}
                self._write(api, "create", {**_TYPE, "metadata": meta, "spec": spec})
        self._pending = None
        log.info(
            "published %d devices in %d ResourceSlice(s): pool %s generation %d",
            len(entries),
            len(want),
            self.node,
            target,
        )
        self._done(target, None)

    def _done(self, generation: int, error: Optional[str]) -> None:
        with self._cond:
            self.generation = generation
            self.last_error = error
            self.in_sync = True
            self._cond.notify_all()

    def _matches(
        self, current: List[Obj], want: List[List[Obj]], generation: int, owner: Obj
    ) -> bool:
        if len(current) != len(want):
            return False
        pool = {"name": self.node, "generation": generation, "resourceSliceCount": len(want)}
        for s, devices in zip(current, want):
            spec = s.get("spec") or {}
            if spec.get("pool") != pool or (spec.get("devices") or []) != devices:
                return False
            if not _owned(s, owner):
                return False
        return True

    def _write(self, api: Any, verb: str, body: Obj) -> None:
        name = body["metadata"].get("name", "")
        try:
            if verb == "update":
                resp = api.replace_resource_slice(
                    name, body, _preload_content=False, _request_timeout=self.kube.timeout
                )
            else:
                resp = api.create_resource_slice(
                    body, _preload_content=False, _request_timeout=self.kube.timeout
                )
        except Exception as e:
            f = kubeapi.failure(e)
            metrics.DRA_SLICE_WRITES.labels(verb, _result(f)).inc()
            if f is not None and verb == "update" and f.status == 409:
                self._refetch(api, name)
                raise _Retry() from None
            if f is not None and verb == "update" and f.status == 404:
                with self._cond:
                    self._cache.pop(name, None)
                raise _Retry() from None
            raise
        metrics.DRA_SLICE_WRITES.labels(verb, "ok").inc()
        stored = json.loads(resp.data)
        with self._cond:
            self.writes += 1
            self._remember(stored)
        sent_taints = any("taints" in d for d in body["spec"]["devices"])
        if sent_taints and not any("taints" in d for d in stored["spec"].get("devices") or []):
            # Kubernetes before 1.36 has device taints behind the DRADeviceTaints feature gate,
            # off by default, and then drops them from what it stores: comparing would rewrite
            # the slice for ever.
            log.warning(
                "the API server dropped the device taints (feature gate DRADeviceTaints off): "
                "NICs without carrier or netdev are left out of the ResourceSlices instead"
            )
            self.taints_supported = False
            raise _Retry()
        if sent_taints:
            self.taints_supported = True

    def _delete(self, api: Any, obj: Obj) -> None:
        meta = obj["metadata"]
        body = {"preconditions": {"uid": meta["uid"], "resourceVersion": meta["resourceVersion"]}}
        try:
            api.delete_resource_slice(
                meta["name"], body=body, _preload_content=False, _request_timeout=self.kube.timeout
            )
        except Exception as e:
            f = kubeapi.failure(e)
            metrics.DRA_SLICE_WRITES.labels("delete", _result(f)).inc()
            if f is not None and f.status == 404:
                with self._cond:
                    self._cache.pop(meta["name"], None)
                return
            if f is not None and f.status == 409:
                self._refetch(api, meta["name"])
                raise _Retry() from None
            raise
        metrics.DRA_SLICE_WRITES.labels("delete", "ok").inc()
        with self._cond:
            self.writes += 1
            self._cache.pop(meta["name"], None)

    def _refetch(self, api: Any, name: str) -> None:
        try:
            resp = api.read_resource_slice(
                name, _preload_content=False, _request_timeout=self.kube.timeout
            )
        except Exception as e:
            f = kubeapi.failure(e)
            if f is not None and f.status == 404:
                with self._cond:
                    self._cache.pop(name, None)
                return
            raise
        with self._cond:
            self._remember(json.loads(resp.data))

    def _remember(self, obj: Obj) -> None:
        """Cache what a write or read returned, unless the watch already brought a newer
        version (someone wrote after us: the cache must not go back). Lock held."""
        name = obj["metadata"]["name"]
        cached = self._cache.get(name)
        if cached is None or _rv(obj) >= _rv(cached):
            self._cache[name] = obj


_TYPE = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice"}


def _result(f: Optional[kubeapi.Failure]) -> str:
    if f is None:
        return "error"
    return "unreachable" if f.unreachable else str(f.status)


def _generation(s: Obj) -> int:
    try:
        return int(s["spec"]["pool"]["generation"])
    except (KeyError, TypeError, ValueError):
        return 0


def _slice_order(s: Obj) -> Tuple[str, str]:
    devices = (s.get("spec") or {}).get("devices") or []
    first = devices[0].get("name", "") if devices else "~"
    return (first, s["metadata"]["name"])


def _owned(s: Obj, owner: Obj) -> bool:
    refs = s["metadata"].get("ownerReferences") or []
    return any(r.get("uid") == owner["uid"] and r.get("kind") == "Node" for r in refs)
