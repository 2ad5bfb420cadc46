"""A ConfigMap volume as the kubelet writes it (its AtomicWriter, kubernetes
pkg/volume/util/atomic_writer.go): the data in a timestamped directory `..<UTC time>.<random>`,
`..data` a symlink to it, each key a symlink `<key> -> ..data/<key>`. An update writes a new
timestamped directory, points a new `..data_tmp` symlink at it and renames that over `..data`
(the one atomic step a reader can see), then drops keys that went and the old directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict

DATA = "..data"
DATA_TMP = "..data_tmp"


def project(target: Path, data: Dict[str, str], *, mode: int = 0o644) -> bool:
    """Write `data` (key -> text) into the volume directory `target` as the kubelet does;
    False when it already holds exactly that (the kubelet writes nothing then)."""
    for key in data:
        if not key or key.startswith("..") or "/" in key:
            raise ValueError(f"ConfigMap key {key!r}: the kubelet refuses it")
    old = None
    try:
        old = os.readlink(target / DATA)
    except FileNotFoundError:
        pass
    if old is not None:
        old_dir = target / old
        old_keys = {p.name for p in old_dir.iterdir()}
        if old_keys == set(data) and all((old_dir / k).read_text() == v for k, v in data.items()):
            return False
    else:
        old_keys = set()
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    ts_dir = Path(tempfile.mkdtemp(prefix=stamp, dir=target))
    os.chmod(ts_dir, 0o755)
    for key, text in data.items():
        path = ts_dir / key
        path.write_text(text)
        os.chmod(path, mode)
    for key in data:
        visible = target / key
        if not visible.is_symlink():
            os.symlink(os.path.join(DATA, key), visible)
    os.symlink(ts_dir.name, target / DATA_TMP)
    os.rename(target / DATA_TMP, target / DATA)
    for key in old_keys - set(data):
        (target / key).unlink()
    if old is not None:
        shutil.rmtree(target / old)
    return True
