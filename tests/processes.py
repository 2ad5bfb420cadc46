"""Telling a process apart from a later one with the same pid (a test's own leftovers)."""

from __future__ import annotations

from typing import Optional


def start_time(pid: int) -> Optional[str]:
    """The process's start time (field 22 of /proc/<pid>/stat): a pid alone may be reused.
    None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
