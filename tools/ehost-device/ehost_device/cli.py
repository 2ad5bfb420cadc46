"""The executable's entry: read the CNI call, answer VERSION at once, hand the rest to `plugin`.

VERSION imports nothing beyond `json` (no pyroute2, not even `conf`): runtimes probe it often.
"""

from __future__ import annotations

import json
import os
import sys


def _stdin() -> bytes:
    if sys.stdin is None or sys.stdin.isatty():
        return b""
    return sys.stdin.buffer.read()


def main() -> int:
    import ehost_device as conf

    environ = os.environ
    data = _stdin()
    if environ.get("CNI_COMMAND") == "VERSION":
        version = conf.LATEST
        try:
            asked = json.loads(data.decode("utf-8")) if data.strip() else {}
            if isinstance(asked, dict) and isinstance(asked.get("cniVersion"), str):
                version = asked["cniVersion"]
        except (UnicodeDecodeError, ValueError):
            pass
        answer = {"cniVersion": version, "supportedVersions": list(conf.SUPPORTED_VERSIONS)}
        sys.stdout.write(json.dumps(answer) + "\n")
        return 0
    if not environ.get("CNI_COMMAND"):
        sys.stderr.write(
            "ehost-device: CNI plugin for virtio NICs (CNI "
            + ", ".join(conf.SUPPORTED_VERSIONS)
            + "); run by a container runtime with CNI_COMMAND set\n"
        )
    from ehost_device import plugin

    status, out = plugin.run(environ, data)
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return status
