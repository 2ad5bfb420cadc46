"""The test suite's totals and figures, added up over the JUnit reports Pants writes per test file
(pants.toml [test] report: dist/test/reports). Run by build-support/check-all after the Pants
run: Pants shows pytest's own output only for files that failed, so this prints what the whole
suite did. Stdlib only (the machine's python3); `virtdp_figures`, the pytest plugin that records
the figures, formats its closing line with `line` from here.

    python3 build-support/pytest-plugins/virtdp_summary.py [REPORT_DIR]

Exit 0 when the suite passed and really ran: tests ran, pods went through containerd, a
container of the shipped image ran, and no NIC was lost or lease leaked; else 1 with the reason.
"""

from __future__ import annotations

import glob
import os
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

FIELDS = (
    "scenarios_passed",
    "faults_survived",
    "bad_inputs_tried",
    "nics_lost",
    "leases_leaked",
    "cri_sandboxes",
    "image_containers",
)
DEFAULT_REPORTS = "dist/test/reports"


def line(**figures: int) -> str:
    """The figures line, as each pytest session and this summary print it."""
    return (
        "virtdp e2e: scenarios passed {scenarios_passed}, faults survived {faults_survived}, "
        "bad inputs tried {bad_inputs_tried}, NICs lost {nics_lost}, "
        "leases leaked {leases_leaked}, CRI sandboxes {cri_sandboxes}, "
        "image containers {image_containers}".format(**figures)
    )


def summarize(report_dir: str) -> List[str]:
    """The summary lines, then the failure reason as the last line if the run does not pass
    (prefixed `FAIL: `)."""
    totals = dict(tests=0, failures=0, errors=0, skipped=0)
    figures: Dict[str, int] = dict.fromkeys(FIELDS, 0)
    seen_figures = False
    files = sorted(glob.glob(os.path.join(report_dir, "**", "*.xml"), recursive=True))
    for path in files:
        root = ET.parse(path).getroot()
        for suite in [root] if root.tag == "testsuite" else root.iter("testsuite"):
            for key in totals:
                totals[key] += int(suite.get(key, 0))
            for prop in suite.iter("property"):
                name = prop.get("name", "")
                if name.startswith("virtdp_") and name[7:] in figures:
                    figures[name[7:]] += int(prop.get("value", 0))
                    seen_figures = True
    failed = totals["failures"] + totals["errors"]
    passed = totals["tests"] - failed - totals["skipped"]
    out = [f"{len(files)} test files"]
    if seen_figures:
        out.append(line(**figures))
    out.append(f"tests: {passed} passed, {failed} failed, {totals['skipped']} skipped")
    reason = _failure(totals, figures, failed)
    if reason:
        out.append(f"FAIL: {reason}")
    return out


def _failure(totals: Dict[str, int], figures: Dict[str, int], failed: int) -> Optional[str]:
    if totals["tests"] == 0:
        return "no tests ran: the test selection is empty (or the Pants run stopped before tests)"
    if figures["cri_sandboxes"] == 0:
        return "no pod sandbox ran through containerd: tests/runtime skipped (containerd missing?)"
    if figures["image_containers"] == 0:
        return (
            "no container of the shipped image ran: tests/runtime/test_image.py skipped "
            "(buildah or debootstrap missing?)"
        )
    if figures["nics_lost"] or figures["leases_leaked"]:
        return "NICs were lost or IPAM leases leaked"
    if failed:
        return f"{failed} tests failed"
    return None


def main(argv: List[str]) -> int:
    lines = summarize(argv[1] if len(argv) > 1 else DEFAULT_REPORTS)
    print("\n".join(lines))
    return 1 if lines[-1].startswith("FAIL: ") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
