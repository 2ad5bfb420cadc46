"""How tests run the four tools: as shipped (PEX) under Pants, from source in a dev checkout."""

from __future__ import annotations

import os


def tool_command(name: str) -> list[str]:
    """argv that runs one of the four tools the way it ships.

    Under Pants the test depends on the tool's pex_binary, which lands in the sandbox as
    `<name>.pex`: the test then drives the real PEX. `VIRTDP_PEX_DIR` points at a folder of
    built PEX files (e.g. dist/). Otherwise (plain pytest in a dev checkout) the tool's module
    runs from source with the current interpreter.
    """
    import os
    import sys

    candidates = [os.path.join(os.getcwd(), f"{name}.pex")]
    if os.environ.get("VIRTDP_PEX_DIR"):
        candidates.insert(0, os.path.join(os.environ["VIRTDP_PEX_DIR"], f"{name}.pex"))
    for path in candidates:
        if os.path.exists(path):
            return [path]
    return [sys.executable, "-m", name.replace("-", "_")]


def node_policy(path: os.PathLike[str] | str, sysfs_root: str, **settings: object) -> dict:
    """Write an ehost-device node policy file at `path` (sysfsRoot on `sysfs_root`, plus
    `settings`, e.g. logFile) and return the environment that points the plugin at it.

    Node-side settings reach ehost-device only this way, never through a network config."""
    import json
    import os

    values = {"sysfsRoot": str(sysfs_root), **settings}
    lines = [f"{k}: {json.dumps(v)}" for k, v in values.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"EHOST_DEVICE_POLICY": os.fspath(path)}
