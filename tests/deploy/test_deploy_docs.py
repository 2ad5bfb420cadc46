"""docs/: the generated references are what docs/gen.py makes from the code now, every tool
command line in the docs parses with the real CLI, every link and file named exists, and the
README's first screen holds what a newcomer needs: the two commands (the second is what CI runs),
how long it takes, what it installs, and an index of every page under docs/."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Tuple

import pytest
import typer

TOOLS = {
    "virtdp-serve": "virtdp_serve.cli",
    "virtdp-inspect": "virtdp_inspect.cli",
    "virtdp-discover": "virtdp_discover.cli",
}
PAGES = (
    "operator-guide.md",
    "dra-operator.md",
    "architecture.md",
    "config-reference.md",
    "metrics.md",
    "policy-reference.md",
    "deployment.md",
    "development.md",
    "virtdp-discover.md",
    "virtdp-serve.md",
    "virtdp-inspect.md",
    "ehost-device.md",
    "dra-cni.md",
)


def load_generator(repo_root: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("virtdp_docs_gen", repo_root / "docs" / "gen.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_references_match_the_code(repo_root: Path) -> None:
    import difflib

    gen = load_generator(repo_root)
    stale = gen.stale_pages(repo_root / "docs")
    diffs = []
    for name in stale:
        path = repo_root / "docs" / name
        old = path.read_text().splitlines() if path.is_file() else []
        new = gen.PAGES[name]().splitlines()
        diffs += list(difflib.unified_diff(old, new, f"docs/{name}", "generated", lineterm=""))
    assert stale == [], "run: python3 docs/gen.py\n" + "\n".join(diffs[:60])


def test_a_stale_reference_is_caught(repo_root: Path, tmp_path: Path) -> None:
    gen = load_generator(repo_root)
    for name in gen.PAGES:
        shutil.copy(repo_root / "docs" / name, tmp_path / name)
    page = tmp_path / "metrics.md"
    page.write_text(page.read_text().replace("virtdp_devices", "virtdp_nics", 1))
    (tmp_path / "config-reference.md").unlink()
    assert sorted(gen.stale_pages(tmp_path)) == ["config-reference.md", "metrics.md"]


def test_references_cover_every_key_and_metric(repo_root: Path) -> None:
    from virtcore import pools
    from virtdp_serve import metrics

    config_page = (repo_root / "docs" / "config-reference.md").read_text()
    for key in pools.SCHEMA:
        assert f"`{key.path}`" in config_page
    from ehost_device import policy

    policy_page = (repo_root / "docs" / "policy-reference.md").read_text()
    for key in policy.SCHEMA:
        assert f"`{key.path}`" in policy_page
    metrics_page = (repo_root / "docs" / "metrics.md").read_text()
    for family in metrics.REGISTRY.collect():
        assert f"`{family.name}" in metrics_page


# -- command lines in the docs ------------------------------------------------------------------


def doc_commands(text: str) -> List[Tuple[str, List[str]]]:
    """(tool, args) of every tool command in the fenced shell blocks of a markdown page."""
    found = []
    for block in re.findall(r"```(?:sh|console|bash)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            for i, w in enumerate(words):
                if w in TOOLS and (i == 0 or words[i - 1] == "--"):
                    args = []
                    for a in words[i + 1 :]:
                        if a in ("|", ">", ";", "&&", "||"):
                            break
                        args.append(a)
                    found.append((w, args))
    return found


def path_option(p: Any) -> Tuple[bool, bool]:
    """(takes a path, may be a directory) for a click option, or a typer >= 0.20 one."""
    t = getattr(p, "type", None)
    if t is not None:
        return getattr(t, "name", "") == "path", getattr(t, "dir_okay", True)
    descriptor = getattr(p, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    info = getattr(descriptor, "parameter_info", None)
    is_path = annotation is Path or Path in getattr(annotation, "__args__", ())
    return is_path, getattr(info, "dir_okay", True) is not False


def fake_path_values(cmd: Any, args: List[str], tmp: Path, sysfs: Path) -> List[str]:
    """`args` with path values replaced by paths that exist here (they name the node's)."""
    flags = {}
    stack = [cmd]
    while stack:
        c = stack.pop()
        flags.update({o: p for p in c.params for o in getattr(p, "opts", ())})
        stack.extend(getattr(c, "commands", {}).values())
    some_file = tmp / "file"
    some_file.write_text("pools:\n  - resourceName: kernel.org/virt\n")
    out = list(args)
    for i, a in enumerate(out[:-1]):
        p = flags.get(a)
        if p is not None:
            is_path, dir_ok = path_option(p)
            if is_path:
                out[i + 1] = str(sysfs if dir_ok else some_file)
    return out


def test_every_documented_command_parses(repo_root: Path, tmp_path: Path, fake_sysfs: Any):
    import importlib

    texts = {p: (repo_root / "docs" / p).read_text() for p in PAGES}
    readme = repo_root / "README.md"
    if readme.is_file():
        texts["README.md"] = readme.read_text()
    commands = [(page, c) for page, text in texts.items() for c in doc_commands(text)]
    tools_seen = {tool for _, (tool, _) in commands}
    assert len(commands) >= 12 and tools_seen >= {"virtdp-inspect", "virtdp-discover"}
    apps: Dict[str, Any] = {
        t: typer.main.get_command(importlib.import_module(m).app) for t, m in TOOLS.items()
    }
    for page, (tool, args) in commands:
        cmd = apps[tool]
        real = fake_path_values(cmd, args, tmp_path, fake_sysfs.root)
        subcommands = getattr(cmd, "commands", None)
        if subcommands is not None:
            # A group (virtdp-inspect): its own options, the subcommand, the subcommand's args.
            i = next((i for i, a in enumerate(real) if not a.startswith("-")), len(real))
            assert i < len(real) and real[i] in subcommands, f"{page}: `{tool} {args}`"
            cmd, real = subcommands[real[i]], real[:i] + real[i + 1 :]
        try:
            cmd.make_context(tool, list(real))
        except Exception as e:  # noqa: BLE001 - click's usage errors, whatever click is in use
            pytest.fail(f"{page}: `{tool} {' '.join(args)}` does not parse: {e}")


def test_doc_links_and_named_files_exist(repo_root: Path) -> None:
    for name in PAGES:
        text = (repo_root / "docs" / name).read_text()
        for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", text):
            assert (repo_root / "docs" / target).is_file(), f"{name}: link to {target}"
        for path in set(re.findall(r"\b(deployments/[\w./-]+\.(?:yaml|sh))\b", text)):
            assert (repo_root / path).is_file(), f"{name}: names {path}, which does not exist"
        for path in set(re.findall(r"\b(deployments/Containerfile)\b", text)):
            assert (repo_root / path).is_file()


# -- the README's first screen -------------------------------------------------------------------


def test_readme_first_screen_is_the_newcomer_path(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:40])
    blocks = re.findall(r"```\n(.*?)```", first_screen, flags=re.S)
    commands = blocks[0].splitlines()
    assert commands == [
        "./pants package tools/virtdp-discover: && dist/virtdp-discover.pex",
        "build-support/check-all",
    ]
    # The second command is the Pants run CI makes, then the summary of its reports.
    check_all = (repo_root / "build-support" / "check-all").read_text()
    assert "./pants --no-pantsd tailor --check lint check test --force package ::" in check_all
    assert "virtdp_summary.py" in check_all
    # How long, and what it installs (what ./pants apt-installs when missing).
    assert re.search(r"takes\s+(about\s+)?\d+ minutes", first_screen), "how long it takes"
    pants = (repo_root / "pants").read_text()
    packages = [
        name
        for call in re.findall(r"apt_install ((?:[^\n]*\\\n)*[^\n]*)", pants)
        for name in call.replace("\\", " ").split()
    ]
    assert "containerd" in packages, "./pants no longer apt-installs what the tests need?"
    for name in packages:
        assert name in first_screen, f"{name} (./pants installs it) not on the first screen"
    # The figures line is in the form the suite prints it.
    from virtdp_summary import FIELDS, line

    [shown] = [x for x in blocks[1].splitlines() if x.startswith("virtdp e2e:")]
    numbers = re.findall(r"\d+", shown.split(":", 1)[1])
    assert len(numbers) == len(FIELDS) and shown == line(**dict(zip(FIELDS, map(int, numbers))))


def test_readme_indexes_every_page(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)\)", readme))
    for target in linked:
        assert (repo_root / "docs" / target).is_file(), f"README links to docs/{target}"
    assert linked >= set(PAGES), f"README does not list {sorted(set(PAGES) - linked)}"
