"""A network config list (conflist) run the way libcni runs one, for the CNI tests.

What containerd and CRI-O do through libcni (tests/runtime drives the real thing), here with
each plugin exec'd by the rig (`Rig.cni`, ehost-device as shipped and Debian's plugins from
/usr/lib/cni), following libcni's `AddNetworkList`, `CheckNetworkList` and `DelNetworkList`:

- each plugin's config is its list entry with the list's `name` and `cniVersion` injected,
  and the `prevResult` when there is one;
- ADD runs the plugins in order, each given the previous plugin's result as `prevResult`
  (none for the first); the first failure ends the ADD (the runtime then DELs); the last
  result is the list's, cached per (network, container ID, CNI_IFNAME);
- CHECK (0.4.0+) runs them in order, each given the cached result;
- DEL runs them in reverse, each given the cached result (0.4.0+; none when there is no
  cache: a DEL after the cache went, as containerd's second DEL), then drops the cache; the
  first failure ends the DEL with the cache kept.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Tuple

CNI_BIN = "/usr/lib/cni"


class ListError(AssertionError):
    """A plugin of the list failed; `run` is its CniRun."""

    def __init__(self, plugin: str, command: str, run: Any) -> None:
        self.plugin = plugin
        self.run = run
        super().__init__(f"{command} of {plugin} failed: rc={run.rc} {run.stdout!r}")


class ConfList:
    """One conflist on one node; `call(command, conf, argv=..., **kw)` runs one plugin (the
    rig's `cni`), `kw` being the runtime's call (pod, container_id, ifname, env)."""

    def __init__(self, conflist: Dict[str, Any], call: Callable[..., Any]) -> None:
        self.conflist = conflist
        self.call = call
        self.cache: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self.runs: List[Tuple[str, str, Any]] = []  # (command, plugin type, CniRun)

    @property
    def version(self) -> str:
        return str(self.conflist["cniVersion"])

    def _conf(self, plugin: Dict[str, Any], prev: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        conf = copy.deepcopy(plugin)
        conf["name"] = self.conflist["name"]
        conf["cniVersion"] = self.version
        if prev is not None:
            conf["prevResult"] = copy.deepcopy(prev)
        return conf

    def _exec(self, command: str, plugin: Dict[str, Any], prev: Any, kw: Dict[str, Any]) -> Any:
        ptype = plugin["type"]
        argv = None if ptype == "ehost-device" else [f"{CNI_BIN}/{ptype}"]
        run = self.call(command, self._conf(plugin, prev), argv=argv, **kw)
        self.runs.append((command, ptype, run))
        if run.rc != 0:
            raise ListError(ptype, command, run)
        return run

    def _key(self, kw: Dict[str, Any]) -> Tuple[str, str]:
        return (kw.get("container_id", "ctr1"), kw.get("ifname", "eth0"))

    def add(self, **kw: Any) -> Dict[str, Any]:
        kw.setdefault("ifname", "eth0")
        prev = None
        for plugin in self.conflist["plugins"]:
            prev = self._exec("ADD", plugin, prev, kw).out
        assert prev is not None
        self.cache[self._key(kw)] = prev
        return prev

    def check(self, only: Optional[str] = None, **kw: Any) -> None:
        """CHECK, of the plugins of type `only` when given. The reference plugins (ptp,
        bridge) check every IP of the result on their own interface (their pkg/ip
        ValidateExpectedInterfaceIPs), so a chained result that lists another interface's IPs
        fails their CHECK whoever added it; CRI runtimes do not call CHECK."""
        kw.setdefault("ifname", "eth0")
        cached = self.cache.get(self._key(kw))
        assert cached is not None, "libcni: no cached result to CHECK against"
        for plugin in self.conflist["plugins"]:
            if only is None or plugin["type"] == only:
                self._exec("CHECK", plugin, cached, kw)

    def delete(self, **kw: Any) -> None:
        kw.setdefault("ifname", "eth0")
        cached = self.cache.get(self._key(kw))
        if self.version < "0.4.0":
            cached = None
        for plugin in reversed(self.conflist["plugins"]):
            self._exec("DEL", plugin, cached, kw)
        self.cache.pop(self._key(kw), None)
