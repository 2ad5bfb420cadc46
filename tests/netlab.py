"""Real network namespaces and veth pairs for tests, with unique names and guaranteed cleanup.

Two test processes run at once: every name carries a random tag. Test links never touch the
root namespace: both ends of a veth pair are created inside namespaces the test made.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from typing import Iterator, List, Sequence, Tuple

NETNS_DIR = "/var/run/netns"


def tag(n: int = 6) -> str:
    return secrets.token_hex(n // 2 + 1)[:n]


def run(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, input=input)


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    return run(*cmd, check=check)


class Netns:
    """A named network namespace (`/var/run/netns/<name>`), deleted on close."""

    def __init__(self, prefix: str = "vt") -> None:
        self.name = f"{prefix}-{tag(8)}"
        ip("netns", "add", self.name)
        ip("link", "set", "lo", "up", ns=self.name)

    @property
    def path(self) -> str:
        return os.path.join(NETNS_DIR, self.name)

    def exec(
        self, *cmd: str, check: bool = True, env: dict | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd],
            check=check,
            capture_output=True,
            text=True,
            env=env,
            input=input,
        )

    def links(self) -> List[str]:
        out = ip("-o", "link", "show", ns=self.name).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]

    def close(self) -> None:
        ip("netns", "del", self.name, check=False)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def veth(
    ns_a: Netns, name_a: str, ns_b: Netns, name_b: str, *, mac: str | None = None, up: bool = True
) -> None:
    """A veth pair with `name_a` in `ns_a` and its peer `name_b` in `ns_b`, both up."""
    tmp = f"t{tag(8)}"
    ip("link", "add", tmp, "type", "veth", "peer", "name", name_b, "netns", ns_b.name, ns=ns_a.name)
    ip("link", "set", tmp, "name", name_a, ns=ns_a.name)
    if mac:
        ip("link", "set", name_a, "address", mac, ns=ns_a.name)
    if up:
        ip("link", "set", name_a, "up", ns=ns_a.name)
        ip("link", "set", name_b, "up", ns=ns_b.name)


@contextlib.contextmanager
def namespaces(*prefixes: str) -> Iterator[Sequence[Netns]]:
    made: List[Netns] = []
    try:
        for p in prefixes:
            made.append(Netns(p))
        yield made
    finally:
        for ns in reversed(made):
            ns.close()


# A GET from inside a namespace with the stdlib alone (no proxies): "<status>\n<body>", status 0
# when nothing answered.
_HTTP_GET = r"""
import sys, urllib.request, urllib.error
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    r = opener.open(sys.argv[1], timeout=3)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
except OSError as e:
    print(0); print(e)
"""


def http_get(ns: Netns, url: str) -> Tuple[int, str]:
    """(HTTP status, body) of a GET of `url` from inside `ns`; (0, why) when nothing answered."""
    import sys

    p = ns.exec(sys.executable, "-c", _HTTP_GET, url, check=False)
    code, _, body = p.stdout.partition("\n")
    return int(code or 0), body
