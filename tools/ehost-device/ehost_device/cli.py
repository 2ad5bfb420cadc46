"""The executable's entry: read the CNI call, answer VERSION at once, hand the rest to the warm
executor (`front`), or, when there is none for us, to `plugin` in this process.

VERSION imports nothing beyond `lean_json` (no pyroute2, not `conf`, not even `json`):
runtimes probe it often, and `main` returns its status. The executor path imports only os,
sys, socket, struct and `lean_json`. Every other command ends the process itself once its
answer is written (`_exit_now`): `main` does not return from them. `ehost-device serve|probe
...` (arguments, no CNI_COMMAND) runs the executor itself (`serve`).
"""

from __future__ import annotations

import os
import sys


def _stdin() -> bytes:
    if sys.stdin is None or sys.stdin.isatty():
        return b""
    return sys.stdin.buffer.read()


def version_answer(data: bytes) -> str:
    """The VERSION answer (stdout text) to the config `data`."""
    import ehost_device as conf
    from ehost_device import lean_json

    version = conf.LATEST
    try:
        asked = lean_json.loads(data.decode("utf-8")) if data.strip() else {}
        # Echo the caller's version (spec 1.1, "VERSION Success"), but never an empty one:
        # libcni's decoder rejects a VERSION answer whose cniVersion is "".
        if isinstance(asked, dict) and isinstance(asked.get("cniVersion"), str):
            version = asked["cniVersion"].strip() or version
    except (UnicodeDecodeError, ValueError):
        pass
    answer = {"cniVersion": version, "supportedVersions": list(conf.SUPPORTED_VERSIONS)}
    return lean_json.dumps(answer) + "\n"


def main() -> int:
    import ehost_device as conf

    environ = os.environ
    if len(sys.argv) > 1 and not environ.get("CNI_COMMAND"):
        from ehost_device import serve

        return serve.main(sys.argv[1:])
    data = _stdin()
    if environ.get("CNI_COMMAND") == "VERSION":
        sys.stdout.write(version_answer(data))
        return 0
    if not environ.get("CNI_COMMAND"):
        sys.stderr.write(
            "ehost-device: CNI plugin for virtio NICs (CNI "
            + ", ".join(conf.SUPPORTED_VERSIONS)
            + "); run by a container runtime with CNI_COMMAND set"
            + " (or: ehost-device serve --help)\n"
        )
    from ehost_device import front

    path = front.executor_socket(environ)
    if path is not None:
        answer = front.call(path, environ, data, timeout=front.budget(environ))
        if answer is not None:
            view = memoryview(answer[1])
            while view:
                view = view[os.write(1, view) :]
            os._exit(answer[0])
    import gc

    # One short process, ended by `_exit_now`: the cyclic collector would only walk the few
    # hundred modules being imported, again and again (~5 ms), to free nothing that matters.
    gc.disable()
    import json

    from ehost_device import ipam, plugin

    ipam.die_with_caller()
    status, out = plugin.run(environ, data)
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
    _exit_now(status)
    return status  # not reached


def _exit_now(status: int) -> None:
    """End the process once the answer is out, without the interpreter's teardown.

    A CNI call is one short process, and freeing the few hundred modules pyroute2 brings in
    (asyncio among them) costs ~20 ms, a sixth of the call. Everything that holds state was
    closed by the command's `with` blocks; what is left is flushed here: stdout (the result),
    stderr, and the log handlers (`logging.shutdown` is what atexit would have run).
    """
    import logging

    try:
        sys.stdout.flush()
    finally:
        logging.shutdown()
        sys.stderr.flush()
        os._exit(status)
