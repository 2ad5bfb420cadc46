"""How tests run the four tools: as shipped (PEX) under Pants, from source in a dev checkout."""

from __future__ import annotations


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
