"""One lock per NIC, so two CNI calls racing for the same device run one after the other.

The lock is an flock on `/run/virtdp/ehost-device/<bdf>.lock`. A NIC is named by its PCI
address within one sysfs tree; with a `sysfsRoot` other than /sys (a test's fake tree) the
name also carries a hash of that tree's real path, so two trees that reuse the same PCI
addresses never share a lock. The holder removes the file before releasing it; a waiter that
then gets a lock on a removed file tries again (the usual flock-and-unlink dance), so lock
files do not pile up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from typing import Callable, Iterator, Optional

from ehost_device.conf import E_TRY_AGAIN, CniError

LOCK_DIR = "/run/virtdp/ehost-device"


def lock_path(sysfs_root: str, pci_address: str, lock_dir: str = LOCK_DIR) -> str:
    root = os.path.realpath(sysfs_root)
    if root == "/sys":
        return os.path.join(lock_dir, f"{pci_address}.lock")
    import hashlib  # here: on /sys (every real node) its OpenSSL load is not needed

    tree = hashlib.sha256(root.encode()).hexdigest()[:16]
    return os.path.join(lock_dir, f"{pci_address}@{tree}.lock")


@contextlib.contextmanager
def device_lock(
    sysfs_root: str,
    pci_address: str,
    timeout: float,
    *,
    while_waiting: Optional[Callable[[str], None]] = None,
) -> Iterator[str]:
    """Hold the NIC's lock. `while_waiting(step)` is called between tries (it may raise: an
    ADD whose caller is gone stops waiting)."""
    path = lock_path(sysfs_root, pci_address)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise CniError(
                            E_TRY_AGAIN,
                            f"NIC {pci_address} is busy: another CNI call holds its lock",
                            f"waited {timeout:g}s for {path}",
                        ) from None
                    if while_waiting is not None:
                        while_waiting(f"the lock of NIC {pci_address} was free")
                    time.sleep(0.01)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed it: lock the new file instead
                continue
            try:
                yield path
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            return
        finally:
            os.close(fd)  # releases the flock
