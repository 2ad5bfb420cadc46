"""Directory change notifications (Linux inotify through libc, stdlib ctypes only).

Watch a directory, not a file: editors and Kubernetes replace files (a ConfigMap update swaps
its `..data` symlink with a rename), which a watch on the old file's inode would miss.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# What changes the set or content of a directory's entries.
DIRECTORY_CHANGES = (
    IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ATTRIB
)

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len


@dataclass(frozen=True)
class Event:
    path: Optional[str]  # the watched directory (None after IN_Q_OVERFLOW)
    mask: int
    name: str  # the entry in it ("" for the directory itself)

    @property
    def overflow(self) -> bool:
        return bool(self.mask & IN_Q_OVERFLOW)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Inotify:
    """One inotify instance (a non-blocking fd for a selector) and its directory watches."""

    def __init__(self) -> None:
        self._libc = _libc()
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self._fd = fd
        self._paths: Dict[int, str] = {}

    def fileno(self) -> int:
        return self._fd

    def watch(self, directory: str, mask: int = DIRECTORY_CHANGES) -> None:
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(directory), mask | IN_ONLYDIR)
        if wd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"cannot watch {directory}: {os.strerror(e)}", directory)
        self._paths[wd] = directory

    def watching(self, directory: str) -> bool:
        return directory in self._paths.values()

    def read(self) -> List[Event]:
        """Every queued event; [] when none."""
        events: List[Event] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return events
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset + _HEADER.size <= len(data):
                wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
                offset += _HEADER.size
                name = data[offset : offset + length].rstrip(b"\0").decode("utf-8", "replace")
                offset += length
                path = self._paths.get(wd)
                if mask & IN_IGNORED:
                    self._paths.pop(wd, None)
                events.append(Event(path, mask, name))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._paths.clear()
