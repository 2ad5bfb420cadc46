"""What a newcomer sees first: each shipped tool's --version and --help, as shipped. Every tool
answers --version alike; on/off flags show no value placeholder (`-v` is a flag, not
`-v <bool>`); defaults are shown whole on an 80-column terminal, wrapped, never cut."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from toolrun import tool_command

TOOLS = ("virtdp-discover", "virtdp-serve", "virtdp-inspect", "ehost-device")
HELP = {
    "virtdp-discover": [[]],
    "virtdp-serve": [[]],
    "virtdp-inspect": [[], ["allocations"], ["devices"], ["checkpoint"], ["netns"]],
    "ehost-device": [[], ["serve"], ["probe"]],
}
# Defaults that must read whole in the help (the longest ones).
DEFAULTS = {
    "virtdp-serve": ["/var/lib/kubelet/device-plugins", "/var/run/k8s.cni.cncf.io/devinfo/dp"],
    "virtdp-inspect": [
        "/var/lib/kubelet/pod-resources/kubelet.sock",
        "/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint",
    ],
    "ehost-device": ["/run/virtdp/ehost-device.sock"],
}
FLAGS = {"virtdp-discover": "--verbose", "virtdp-serve": "--verbose"}


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(COLUMNS="80", LINES="24", TERM="dumb")
    return subprocess.run(
        tool_command(tool) + list(args), capture_output=True, text=True, env=env, timeout=60
    )


def unwrapped(text: str) -> str:
    """Help text with its line wrapping undone (click also breaks lines after a hyphen)."""
    return re.sub(r"\s+", " ", re.sub(r"-\n\s+", "-", text))


@pytest.mark.parametrize("tool", TOOLS)
def test_version_answers_alike(tool: str) -> None:
    res = run(tool, "--version")
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(rf"{tool} \d+\.\d+\.\d+\n", res.stdout), res.stdout


@pytest.mark.parametrize("tool", TOOLS)
def test_help_shows_flags_as_flags_and_defaults_whole(tool: str) -> None:
    texts = []
    for sub in HELP[tool]:
        res = run(tool, *sub, "--help")
        assert res.returncode == 0, (sub, res.stderr)
        text = res.stdout
        assert "<bool>" not in text and "…" not in text and "\x1b[" not in text, text
        assert max(len(line) for line in text.splitlines()) <= 80, text
        texts.append(unwrapped(text))
    joined = " ".join(texts)
    for default in DEFAULTS.get(tool, []):
        assert default in joined, f"{default} not shown whole in {tool}'s help"
    flag = FLAGS.get(tool)
    if flag:
        # Shown without a value (its help text follows), and refused with one.
        assert re.search(rf"-v, {flag} +[A-Z]", texts[0]), texts[0]
        res = run(tool, flag, "true")
        assert res.returncode == 2 and "true" in res.stderr, res.stderr
