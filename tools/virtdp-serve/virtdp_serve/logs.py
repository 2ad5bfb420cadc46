"""Logging for virtdp-serve: stderr only, text or one JSON object per line, with levels."""

from __future__ import annotations

import json
import logging
import sys
import time

FORMATS = ("text", "json")
_LIBRARIES = ("pyroute2", "grpc", "asyncio")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, sort_keys=False)


def setup(fmt: str = "text", verbosity: int = 0) -> None:
    """Route every logger to stderr. verbosity 0 = INFO, 1+ = DEBUG."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    if verbosity < 2:
        # Third-party chatter (pyroute2 sets its own loggers' levels) only with -vv.
        handler.addFilter(
            lambda r: r.levelno >= logging.WARNING or not r.name.startswith(_LIBRARIES)
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
