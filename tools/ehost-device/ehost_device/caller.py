"""Whether the caller of the call this thread serves still waits for its answer.

In-process the caller is the runtime that exec'd us: when it gives up it kills us, and the work
dies with us. In the warm executor the caller is a front on a socket, and the call would run on
after the front is gone; so the executor names a `gone` check for the thread that serves a call
(`watching`), and ADD asks it before each step that changes something (`checkpoint`): an ADD
nobody waits for stops there and rolls back like any failed ADD. An ADD that finished before the
executor noticed is undone by the executor itself (serve.Executor).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Optional

from ehost_device.conf import E_TRY_AGAIN, CniError

_CALL = threading.local()


class CallerGone(CniError):
    """The front that handed us this call hung up before its answer."""


@contextlib.contextmanager
def watching(gone: Optional[Callable[[], bool]]) -> Iterator[None]:
    _CALL.gone = gone
    try:
        yield
    finally:
        _CALL.gone = None


def checkpoint(step: str) -> None:
    """Raise CallerGone when the caller of this thread's call has hung up."""
    gone = getattr(_CALL, "gone", None)
    if gone is not None and gone():
        raise CallerGone(
            E_TRY_AGAIN,
            "the caller gave up on this call",
            f"its connection to the executor closed before {step}; the call is rolled back",
        )
