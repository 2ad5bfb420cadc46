"""The shipped ehost-device.pex starts on every CPython a node may have (3.9 to 3.13), with the
bare environment a container runtime gives a CNI plugin (`env -i`: no PATH, no HOME)."""

from __future__ import annotations

import glob
import json
import os
import subprocess

import pytest
from toolrun import tool_command

PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
PCI = "0000:00:07.0"


def _pyenv_python(version: str) -> str:
    root = os.environ.get("PYENV_ROOT") or "/root/.pyenv"
    found = sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", "python3")))
    assert found, f"CPython {version} not found under {root}/versions (this machine kind has it)"
    return found[-1]


def _pex() -> str:
    argv = tool_command("ehost-device")
    if not argv[0].endswith(".pex"):
        pytest.skip("needs the built ehost-device.pex (run under Pants, or VIRTDP_PEX_DIR=dist)")
    return argv[0]


@pytest.mark.parametrize("version", PYTHONS)
def test_version_under_bare_env(version):
    pex = _pex()
    p = subprocess.run(
        ["env", "-i", "CNI_COMMAND=VERSION", _pyenv_python(version), pex],
        input='{"cniVersion": "0.4.0"}',
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["cniVersion"] == "0.4.0"
    assert out["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


def test_sh_boot_launcher_under_bare_env():
    """As installed in /opt/cni/bin: executed directly, it finds /usr/bin/python3 itself."""
    p = subprocess.run(
        ["env", "-i", "CNI_COMMAND=VERSION", _pex()],
        input='{"cniVersion": "1.1.0"}',
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["cniVersion"] == "1.1.0"


@pytest.mark.parametrize("version", ["3.9", "3.13"])
def test_add_del_on_oldest_and_newest_python(rig, version):
    """Not only VERSION: the netlink and namespace plumbing (setns through ctypes before 3.12,
    os.setns after) works on both ends of the range (the rig's environment is a runtime's: the
    CNI_* variables and PATH, no HOME)."""
    argv = [_pyenv_python(version), _pex()]
    rig.nic(PCI, "ens7")
    before = rig.state("ens7")
    pod = rig.pod()
    conf = rig.conf("1.1.0", deviceID=PCI)
    out = rig.cni("ADD", conf, pod=pod, argv=argv).ok()
    assert out["interfaces"][0]["pciID"] == PCI
    assert rig.state("net1", pod)["up"]
    rig.cni("DEL", conf, pod=pod, argv=argv).ok()
    assert rig.state("ens7") == before
    assert rig.leases() == []
