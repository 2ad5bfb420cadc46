"""The executable's entry: read the CNI call, answer VERSION at once, hand the rest to the warm
executor (`front`), or, when there is none for us, to `plugin` in this process.

VERSION imports nothing beyond `lean_json` (not `conf`, not even `json`): runtimes probe it
often, and `main` returns its status. The executor path imports only built-in modules and
`lean_json` (see `front`): not even os, whose import costs a sixth of the interpreter's start.
Every other command ends the process itself once its answer is written (`_exit_now`): `main`
does not return from them. `ehost-device serve|probe ...` (arguments, no CNI_COMMAND) runs the
executor itself (`serve`), `ehost-device install-policy ...` the DaemonSet's policy installer
(`install`).
"""

import posix
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict


def _environ() -> "Dict[str, str]":
    """os.environ's contents, decoded as os decodes them, without importing os."""
    enc = sys.getfilesystemencoding()
    return {
        k.decode(enc, "surrogateescape"): v.decode(enc, "surrogateescape")
        for k, v in posix.environ.items()
    }


def _stdin() -> bytes:
    if sys.stdin is None or sys.stdin.isatty():
        return b""
    return sys.stdin.buffer.read()


def main() -> int:
    import ehost_device

    environ = _environ()
    if len(sys.argv) > 1 and not environ.get("CNI_COMMAND"):
        if sys.argv[1] == "install-policy":  # resident in the DaemonSet: no gRPC
            from ehost_device import install

            return install.main(sys.argv[2:])
        from ehost_device import serve

        return serve.main(sys.argv[1:])
    data = _stdin()
    if environ.get("CNI_COMMAND") == "VERSION":
        sys.stdout.write(ehost_device.version_answer(data))
        return 0
    if not environ.get("CNI_COMMAND"):
        sys.stderr.write(
            "ehost-device: CNI plugin for virtio NICs (CNI "
            + ", ".join(ehost_device.SUPPORTED_VERSIONS)
            + "); run by a container runtime with CNI_COMMAND set"
            + " (or: ehost-device serve --help)\n"
        )
    from ehost_device import front

    path = front.executor_socket(environ)
    if path is not None:
        answer = front.call(path, environ, data, timeout=front.budget(environ))
        if answer is not None:
            front.write_all(1, answer[1])
            posix._exit(answer[0])
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

    A CNI call is one short process: freeing the modules it loaded would cost time for nothing.
    Everything that holds state was closed by the command's `with` blocks; what is left is
    flushed here: stdout (the result), stderr, and the log handlers (`logging.shutdown` is what
    atexit would have run).
    """
    import logging

    try:
        sys.stdout.flush()
    finally:
        logging.shutdown()
        sys.stderr.flush()
        posix._exit(status)
