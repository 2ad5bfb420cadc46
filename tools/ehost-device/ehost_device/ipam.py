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
from typing import Any, Dict, List, Mapping, Optional

from ehost_device.conf import E_INCOMPATIBLE_VERSION, E_IPAM, E_IPAM_RESULT, CniError

log = logging.getLogger(__name__)

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


def _exec(
    exe: str, command: str, environ: Mapping[str, str], config: Dict[str, Any]
) -> Optional[Dict[str, Any]]:
    env = dict(environ)
    env["CNI_COMMAND"] = command
    try:
        proc = subprocess.run(
            [exe],
            input=json.dumps(config).encode(),
            stdout=subprocess.PIPE,
            stderr=None,  # the delegated plugin's stderr is ours (spec, section 4)
            env=env,
            check=False,
        )
    except OSError as e:
        raise CniError(E_IPAM, f"cannot run IPAM plugin {exe}", str(e)) from None
    out = proc.stdout.decode("utf-8", "replace").strip()
    parsed: Any = None
    if out:
        try:
            parsed = json.loads(out)
        except ValueError:
            parsed = None
    if proc.returncode != 0:
        name = os.path.basename(exe)
        if isinstance(parsed, dict) and isinstance(parsed.get("code"), int):
            raise CniError(
                parsed["code"],
                f"IPAM plugin {name} {command} failed: {parsed.get('msg', '')}",
                str(parsed.get("details", "")),
            )
        raise CniError(
            E_IPAM,
            f"IPAM plugin {name} {command} failed with exit status {proc.returncode}",
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


def run(
    ipam_type: str,
    command: str,
    environ: Mapping[str, str],
    config: Dict[str, Any],
    cni_path: List[str],
) -> Optional[Dict[str, Any]]:
    """Run ADD, DEL or CHECK on the IPAM plugin; its result (ADD) or None."""
    exe = find(ipam_type, cni_path)
    try:
        return _exec(exe, command, environ, config)
    except CniError as e:
        lower = FALLBACK.get(str(config.get("cniVersion")))
        if e.code != E_INCOMPATIBLE_VERSION or lower is None:
            raise
        log.info("IPAM plugin %s refuses %s; asking at %s", ipam_type, config["cniVersion"], lower)
        return _exec(exe, command, environ, lowered(config, lower))


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
