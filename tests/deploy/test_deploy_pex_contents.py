"""What each shipped PEX carries: the distributions its tool imports at run time, and no type
stubs (`types-*`, `*-stubs`: mypy's, inferred with `import yaml`; /BUILD drops them from every
pex_binary)."""

from __future__ import annotations

import json
import re
import zipfile

import pytest
from toolrun import tool_command

# The run-time distributions each tool must carry (not all of them: enough to show the PEX-INFO
# read here is the real one).
EXPECTED = {
    "virtdp-discover": {"pyyaml", "typer", "rich"},
    "virtdp-serve": {"pyyaml", "grpcio", "protobuf", "prometheus-client", "typer"},
    "virtdp-inspect": {"pyyaml", "grpcio", "protobuf", "typer", "rich"},
    "ehost-device": {"prometheus-client"},
}
# The CNI plugin itself is stdlib only (virtcore.netlink speaks rtnetlink): its PEX carries the
# executor's metrics library and nothing else.
ONLY = {"ehost-device": {"prometheus-client"}}


def _project(wheel: str) -> str:
    """`types_PyYAML-6.0.12.20240917-py3-none-any.whl` -> `types-pyyaml` (PEP 503)."""
    return re.sub(r"[-_.]+", "-", wheel.split("-", 1)[0]).lower()


@pytest.mark.parametrize("tool", sorted(EXPECTED))
def test_pex_ships_no_type_stubs(tool: str) -> None:
    path = tool_command(tool)[0]
    if not path.endswith(".pex"):
        pytest.skip(
            f"{tool} runs from source here: no PEX (run under Pants or with VIRTDP_PEX_DIR)"
        )
    # ehost-device.pex starts with a /bin/sh launcher: zipfile reads the archive after it.
    with zipfile.ZipFile(path) as pex:
        info = json.loads(pex.read("PEX-INFO"))
    shipped = {_project(wheel) for wheel in info["distributions"]}
    stubs = sorted(p for p in shipped if p.startswith("types-") or p.endswith("-stubs"))
    assert stubs == [], f"{path} ships type stubs: {stubs}"
    assert EXPECTED[tool] <= shipped, f"{path}: {sorted(shipped)}"
    if tool in ONLY:
        assert shipped <= ONLY[tool], f"{path}: {sorted(shipped)}"
