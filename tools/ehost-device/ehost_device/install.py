"""`ehost-device install-policy`: put the node policy, and the pool config it refers to, where the
plugin on the host and the executor in its container read them; with `--watch`, again whenever
the mounted ConfigMap changes.

The DaemonSet mounts its ConfigMap (`--from`) and the host's /etc/virtdp (`--to`). Every key of
the ConfigMap becomes a file of the same name in the host's /etc/virtdp: `ehost-device.yaml`
(the policy) and `config.yaml` (the pool config `poolConfig` names by default). The executor
container mounts that host directory at /etc/virtdp, so both read the same files at the same
paths.

The rules it keeps:
- Nothing is installed before the whole set checks out, with the plugin's own code
  (`policy.parse`, `policy.pool_config`): the policy parses; the pool config `allowedPools`
  refers to is one of the installed files and holds those pools (read as the plugin reads it,
  with yamlsubset); every path the policy names is one the executor sees as the host does
  (`--shared`), and `executorSocket` is the executor's socket or "" (`--executor-socket`).
  A set that does not is refused and logged; the files installed last stay.
- Each file is replaced atomically (temporary file in the same directory, fsync, rename, fsync
  of the directory), the policy last: a call reads the policy, then the pool config, so it sees
  the old pair, the new pair, or the old policy with the new pool config, never a policy
  naming pools its pool config does not have yet. Files whose content is current are left alone.
- `--watch` waits on inotify for the kubelet's update of the mounted ConfigMap (it swaps the
  `..data` symlink with a rename) and costs nothing in between: no polling.

Exit status: 0 installed, current, or (one-shot) refused while a policy installed earlier stays;
1 refused with no policy on the host yet (the plugin must not run without the policy asked for);
2 bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ehost_device import policy
from virtcore import inotify
from virtcore.schema import ConfigError

log = logging.getLogger("ehost-device-install-policy")

POLICY_KEY = os.path.basename(policy.DEFAULT_PATH)  # ehost-device.yaml
NODE_DIR = os.path.dirname(policy.DEFAULT_PATH)  # /etc/virtdp
FILE_MODE = 0o644
MAX_FILE = 1 << 20  # bytes; a ConfigMap holds at most 1 MiB in all


@dataclass(frozen=True)
class Layout:
    """Where things are: the ConfigMap's mount, the host directory's mount here, that
    directory's path on the host, and what the executor container shares with the host."""

    source: str  # the mounted ConfigMap (a directory of keys)
    target: str  # the host's NODE_DIR as mounted here
    node_dir: str = NODE_DIR
    shared: Tuple[str, ...] = ()  # host directories the executor mounts at the same path
    executor_socket: Optional[str] = None  # the socket the executor serves


def read_keys(source: str) -> Dict[str, bytes]:
    """The ConfigMap's keys and values: every entry not starting with '.' (the kubelet's
    `..data` and timestamped directories), read through its symlink."""
    out: Dict[str, bytes] = {}
    for name in sorted(os.listdir(source)):
        if name.startswith("."):
            continue
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
        if len(data) > MAX_FILE:
            raise ConfigError(
                f"ConfigMap key {name}", "(top level)", "larger than 1 MiB", "at most 1 MiB"
            )
        out[name] = data
    return out


def _under(path: str, dirs: Sequence[str]) -> bool:
    path = os.path.normpath(path)
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def check(keys: Dict[str, bytes], layout: Layout) -> policy.Policy:
    """The policy the keys make, once everything it refers to checks out. Raises ConfigError
    naming the key and what was expected."""
    where = f"ConfigMap key {POLICY_KEY}"
    if POLICY_KEY not in keys:
        raise ConfigError(
            layout.source,
            POLICY_KEY,
            "the ConfigMap has no such key",
            f"the node policy under key {POLICY_KEY} (an empty value means every default)",
        )

    def text(name: str) -> str:
        try:
            return keys[name].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"ConfigMap key {name}",
                "(top level)",
                f"not UTF-8 text ({e.reason})",
                "a UTF-8 YAML file",
            ) from None

    p = policy.parse(text(POLICY_KEY), where)
    if layout.shared:
        # (poolConfig: a file installed into node_dir, checked below.)
        paths = [("sysfsRoot", p.sysfs_root)]
        if p.log_file:
            paths.append(("logFile", os.path.dirname(p.log_file)))
        for key, path in paths:
            if not _under(path, layout.shared):
                raise ConfigError(
                    where,
                    key,
                    f"{path} is outside the host directories the executor container mounts "
                    "(it would read or write other files than the plugin on the host)",
                    f"a path under {', '.join(layout.shared)}",
                )
    if layout.executor_socket is not None and p.executor_socket not in (
        "",
        layout.executor_socket,
    ):
        raise ConfigError(
            where,
            "executorSocket",
            f"{p.executor_socket!r} is not the socket the executor container serves",
            f'{layout.executor_socket} or "" (no executor)',
        )
    if p.allowed_pools:
        name = os.path.basename(p.pool_config)
        if os.path.dirname(os.path.normpath(p.pool_config)) != layout.node_dir or name not in keys:
            raise ConfigError(
                where,
                "poolConfig",
                f"{p.pool_config} is not a file this installer puts on the node",
                f"{layout.node_dir}/<a key of the ConfigMap>, one of "
                f"{[k for k in keys if k != POLICY_KEY]}",
            )
        # As the plugin will read it (virtcore.yamlsubset), named as the node will have it.
        policy.pool_config(p, text=text(name))
    return p


def _current(path: str, data: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return (
                f.read(MAX_FILE + 1) == data and os.fstat(f.fileno()).st_mode & 0o777 == FILE_MODE
            )
    except OSError:
        return False


def write_atomically(directory: str, name: str, data: bytes) -> bool:
    """Replace directory/name with `data` in one rename; False when it already had it."""
    final = os.path.join(directory, name)
    if _current(final, data):
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.install.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return True


def install(layout: Layout) -> Tuple[bool, List[str]]:
    """Check the ConfigMap's keys and install them: (accepted, names of files replaced).
    A refusal is logged; nothing is written then."""
    try:
        keys = read_keys(layout.source)
        check(keys, layout)
    except ConfigError as e:
        log.error(
            "refused the ConfigMap's node policy: %s; %s stays as it is",
            e,
            os.path.join(layout.node_dir, POLICY_KEY),
        )
        return False, []
    except OSError as e:
        log.error("cannot read the ConfigMap at %s: %s", layout.source, e)
        return False, []
    # The policy last (see the module's docstring).
    order = sorted(keys, key=lambda k: (k == POLICY_KEY, k))
    changed = [name for name in order if write_atomically(layout.target, name, keys[name])]
    for name in changed:
        log.info("installed %s", os.path.join(layout.node_dir, name))
    if not changed:
        log.info("%s is current", layout.node_dir)
    return True, changed


def watch(layout: Layout) -> int:
    """Install now, then again after each change of the mounted ConfigMap, until SIGTERM."""
    stop: List[str] = []
    # The signal only notes itself and wakes the wait (through the wakeup pipe): an exception
    # raised from a handler could land anywhere, e.g. inside logging, which swallows it.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda n, _: stop.append(signal.Signals(n).name))
    ino = inotify.Inotify()
    try:
        ino.watch(layout.source)
        install(layout)
        log.info("watching %s for ConfigMap updates", layout.source)
        while not stop:
            ready, _, _ = select.select([ino.fileno(), wake_r], [], [])
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 64):
                        pass
            events = ino.read()
            # The kubelet renames `..data_tmp` to `..data`; a plain directory (tests, a
            # hostPath) changes its files in place. Anything else (its timestamped
            # directories coming and going) is a step of the same update.
            if not stop and any(
                ev.overflow or ev.name == "..data" or not ev.name.startswith(".") for ev in events
            ):
                install(layout)
        log.info("%s: stopped", stop[0])
        return 0
    finally:
        ino.close()
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="ehost-device install-policy",
        description="Install ehost-device's node policy and the files it refers to from a "
        "mounted ConfigMap into the host's /etc/virtdp, atomically, after checking them as the "
        "plugin will read them; with --watch, again on every ConfigMap update.",
    )
    ap.add_argument(
        "--from", dest="source", required=True, metavar="DIR", help="the mounted ConfigMap"
    )
    ap.add_argument(
        "--to", dest="target", required=True, metavar="DIR", help=f"the host's {NODE_DIR}, mounted"
    )
    ap.add_argument(
        "--node-dir",
        default=NODE_DIR,
        metavar="DIR",
        help=f"the path of --to on the host (default {NODE_DIR})",
    )
    ap.add_argument(
        "--shared",
        action="append",
        default=[],
        metavar="DIR",
        help="a host directory the executor container mounts at the same path (repeat); the "
        "policy's paths must lie under one",
    )
    ap.add_argument(
        "--executor-socket",
        metavar="PATH",
        help="the socket the executor container serves; the policy's executorSocket must be "
        'it or ""',
    )
    ap.add_argument(
        "--watch", action="store_true", help="keep running: install again on every update"
    )
    args = ap.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s ehost-device install-policy %(levelname)s %(message)s")
    )
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    for d in (args.source, args.target):
        if not os.path.isdir(d):
            ap.error(f"{d} is not a directory")
    layout = Layout(
        source=args.source,
        target=args.target,
        node_dir=os.path.normpath(args.node_dir),
        shared=tuple(os.path.normpath(d) for d in args.shared),
        executor_socket=args.executor_socket,
    )
    if args.watch:
        return watch(layout)
    accepted, _ = install(layout)
    if accepted:
        return 0
    if os.path.isfile(os.path.join(layout.target, POLICY_KEY)):
        return 0  # the last good policy stays; the refusal is logged
    return 1
