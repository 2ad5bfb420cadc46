"""Delegation to the IPAM plugin (CNI spec 1.1, section 4): find it in CNI_PATH, run it with
our own environment and the complete network config, pass its stderr through.

Version: the config goes to the IPAM plugin as received. A plugin that answers a 1.1.0
ADD/DEL/CHECK with "incompatible CNI version" (code 1; Debian's host-local and static speak up
to 1.0.0) is asked again with `cniVersion` 1.0.0: the IPAM part of a result is the same in
both, so nothing is lost, and a plugin that does speak 1.1.0 still sees 1.1.0. STATUS and GC
exist since 1.1.0 only: they are forwarded when the plugin's VERSION lists 1.1.0; an older
plugin that answers VERSION is taken as ready and has nothing to collect.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from typing import Any, Dict, List, Mapping, Optional

from ehost_device.conf import E_INCOMPATIBLE_VERSION, E_IPAM, E_IPAM_RESULT, CniError

log = logging.getLogger(__name__)

# In the executor each call runs in a thread of its own whose stderr is its front's (`serve`
# sets `fd`): the IPAM plugin's stderr goes there too. In-process it is unset: ours is inherited.
CALL_STDERR = threading.local()

# In-process (`die_with_caller`), the IPAM plugin dies with us: a runtime that kills a timed-out
# ADD and sends DEL at once must not have an orphaned IPAM ADD allocate after that DEL ran.
# The executor outlives its callers and keeps its plugins to the end (serve.Executor).
_DIE_WITH_CALLER = False


def die_with_caller() -> None:
    global _DIE_WITH_CALLER
    _DIE_WITH_CALLER = True


def _parent_death_kills() -> None:  # runs in the child, between fork and exec
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9)  # SIGKILL


# A 1.1.0 request is retried at this version when the IPAM plugin refuses 1.1.0.
FALLBACK = {"1.1.0": "1.0.0"}


def find(ipam_type: str, cni_path: List[str]) -> str:
    for d in cni_path:
        p = os.path.join(d, ipam_type)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise CniError(
        E_IPAM,
        f"IPAM plugin {ipam_type!r} not found",
        f"no executable {ipam_type} in CNI_PATH={':'.join(cni_path)}",
    )


# A write this size into an empty pipe never blocks (Linux pipes hold 64 KiB): a config up to
# it is handed over whole when the plugin starts.
_PIPE_SAFE = 65536


class Call:
    """One run of an IPAM plugin, started at once; `result()` waits for its answer.

    Started early, the plugin (a separate process) works while this one carries on (gives the
    NIC back). A config too big to hand over at once makes the call start in
    `result()` instead: a half-written stdin must not be inherited by our forked helpers.
    """

    def __init__(
        self, exe: str, command: str, environ: Mapping[str, str], config: Dict[str, Any]
    ) -> None:
        self.exe = exe
        self.command = command
        self._env = dict(environ)
        self._env["CNI_COMMAND"] = command
        self._data = json.dumps(config).encode()
        self._proc: Optional[subprocess.Popen] = None
        if len(self._data) <= _PIPE_SAFE:
            self._proc = self._spawn()
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(self._data)
                self._proc.stdin.close()
            except BrokenPipeError:  # it exited without reading: its status says why
                pass

    def _spawn(self) -> subprocess.Popen:
        try:
            return subprocess.Popen(
                [self.exe],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                # The delegated plugin's stderr is ours (spec, section 4).
                stderr=getattr(CALL_STDERR, "fd", None),
                env=self._env,
                preexec_fn=_parent_death_kills if _DIE_WITH_CALLER else None,
            )
        except OSError as e:
            raise CniError(E_IPAM, f"cannot run IPAM plugin {self.exe}", str(e)) from None

    def result(self) -> Optional[Dict[str, Any]]:
        if self._proc is None:
            proc = self._proc = self._spawn()
            out_b, _ = proc.communicate(self._data)
        else:
            proc = self._proc
            assert proc.stdout is not None
            out_b = proc.stdout.read()
            proc.stdout.close()
            proc.wait()
        return _answer(self.exe, self.command, proc.returncode, out_b)

    def wait(self) -> None:
        """Reap the plugin, its answer unread (the caller already has an error to report)."""
        if self._proc is None:
            return
        try:
            self.result()
        except CniError:
            pass


def _answer(exe: str, command: str, returncode: int, out_b: bytes) -> Optional[Dict[str, Any]]:
    out = out_b.decode("utf-8", "replace").strip()
    parsed: Any = None
    if out:
        try:
            parsed = json.loads(out)
        except ValueError:
            parsed = None
    if returncode != 0:
        name = os.path.basename(exe)
        if isinstance(parsed, dict) and isinstance(parsed.get("code"), int):
            raise CniError(
                parsed["code"],
                f"IPAM plugin {name} {command} failed: {parsed.get('msg', '')}",
                str(parsed.get("details", "")),
            )
        raise CniError(
            E_IPAM,
            f"IPAM plugin {name} {command} failed with exit status {returncode}",
            out[:500],
        )
    if not out:
        return None
    if not isinstance(parsed, dict):
        raise CniError(
            E_IPAM_RESULT,
            f"IPAM plugin {os.path.basename(exe)} {command} printed no JSON object",
            out[:500],
        )
    return parsed


def _exec(
    exe: str, command: str, environ: Mapping[str, str], config: Dict[str, Any]
) -> Optional[Dict[str, Any]]:
    return Call(exe, command, environ, config).result()


class Delegation:
    """ADD, DEL or CHECK on the IPAM plugin, started at once (see `Call`); `result()` gives
    its result (ADD) or None, asking again at a lower version if the plugin refuses ours."""

    def __init__(
        self,
        ipam_type: str,
        command: str,
        environ: Mapping[str, str],
        config: Dict[str, Any],
        cni_path: List[str],
    ) -> None:
        self.ipam_type = ipam_type
        self.environ = environ
        self.config = config
        self.exe = find(ipam_type, cni_path)
        self.call = Call(self.exe, command, environ, config)

    def result(self) -> Optional[Dict[str, Any]]:
        try:
            return self.call.result()
        except CniError as e:
            lower = FALLBACK.get(str(self.config.get("cniVersion")))
            if e.code != E_INCOMPATIBLE_VERSION or lower is None:
                raise
            log.info(
                "IPAM plugin %s refuses %s; asking at %s",
                self.ipam_type,
                self.config["cniVersion"],
                lower,
            )
            return _exec(self.exe, self.call.command, self.environ, lowered(self.config, lower))

    def wait(self) -> None:
        self.call.wait()


def start(
    ipam_type: str,
    command: str,
    environ: Mapping[str, str],
    config: Dict[str, Any],
    cni_path: List[str],
) -> Delegation:
    """Start ADD, DEL or CHECK on the IPAM plugin; `.result()` waits for it."""
    return Delegation(ipam_type, command, environ, config, cni_path)


def run(
    ipam_type: str,
    command: str,
    environ: Mapping[str, str],
    config: Dict[str, Any],
    cni_path: List[str],
) -> Optional[Dict[str, Any]]:
    """Run ADD, DEL or CHECK on the IPAM plugin; its result (ADD) or None."""
    return start(ipam_type, command, environ, config, cni_path).result()


def lowered(config: Dict[str, Any], version: str) -> Dict[str, Any]:
    """`config` at an older `version`, its prevResult re-rendered to match."""
    from ehost_device import result

    out = dict(config, cniVersion=version)
    prev = config.get("prevResult")
    if isinstance(prev, dict):
        try:
            out["prevResult"] = result.render(result.parse(prev), version)
        except result.ResultError:
            out["prevResult"] = dict(prev, cniVersion=version)
    return out


def supported_versions(exe: str, environ: Mapping[str, str]) -> List[str]:
    answer = _exec(exe, "VERSION", environ, {"cniVersion": "1.1.0"}) or {}
    versions = answer.get("supportedVersions")
    if not isinstance(versions, list):
        raise CniError(
            E_IPAM_RESULT,
            f"IPAM plugin {os.path.basename(exe)} VERSION gave no supportedVersions",
            json.dumps(answer)[:500],
        )
    return [str(v) for v in versions]
