"""Malformed frames (tests/corpus/frames/*.json, one case per file) sent straight to a running
ehost-device executor's socket: each gets a refusal naming what was wrong (or, for another
protocol version, the executor's own version), and the executor keeps serving real calls.

A case file holds `description`, `expect` (`kind`: refused or mismatch, and a `fragment` of the
reason), and what to send: `raw_text` (bytes as is), or a request `header` (fields over a valid
one: version, flags, env_len, stdin_len; lengths default to what is sent) with `env_text` /
`env_base64` / `body_text`, `cut` (send only this many bytes), `fds` (descriptors to pass;
default what the flags announce).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from pathlib import Path
from typing import Iterator

import pytest
from executor import Executor, source_env
from netlab import Netns
from toolrun import tool_command

from ehost_device import front

CASES = sorted((Path(__file__).parent / "frames").glob("*.json"))
VALID_ENV = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "frames", "CNI_IFNAME": "net1"}
VALID_CONF = {"cniVersion": "1.1.0", "name": "frames", "type": "ehost-device"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    ns = Netns("vfr")
    ex = None
    try:
        ex = Executor(tmp_path_factory.mktemp("frames"), ns.name)
        yield ns, ex
        assert ex.stop() == 0, ex.log()
    finally:
        if ex is not None and ex.proc and ex.proc.poll() is None:
            ex.proc.kill()
        ns.close()


def _frame(case: dict) -> tuple:
    if "raw_text" in case:
        return case["raw_text"].encode(), 0
    h = case["header"]
    if "env_base64" in case:
        env = base64.b64decode(case["env_base64"])
    elif "env_text" in case:
        env = case["env_text"].encode()
    else:
        env = json.dumps(VALID_ENV).encode()
    if "body_text" in case:
        env, stdin = case["body_text"].encode(), b""
    else:
        stdin = json.dumps(VALID_CONF).encode()
    flags = h.get("flags", 0)
    head = front.REQUEST.pack(
        h.get("magic", "EHDX").encode(),
        h.get("version", front.VERSION),
        flags,
        0,
        h.get("env_len", len(env)),
        h.get("stdin_len", len(stdin)),
    )
    data = head + env + stdin
    if "cut" in case:
        data = data[: case["cut"]]
    announced = 1 + bool(flags & front.F_POD_NETNS) + bool(flags & front.F_STDERR)
    return data, case.get("fds", announced)


def _still_serving(ns: Netns, ex: Executor) -> None:
    before = len(ex.calls())
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **VALID_ENV, **ex.env(), **source_env()}
    p = ns.exec(*tool_command("ehost-device"), env=env, input=json.dumps(VALID_CONF), check=False)
    assert p.returncode == 0, (p.stdout, p.stderr, ex.log()[-2000:])
    assert len(ex.calls()) == before + 1, "the call did not go through the executor"


def test_frame_corpus_is_there():
    assert len(CASES) >= 12


@pytest.mark.parametrize("case_file", CASES, ids=[p.stem for p in CASES])
def test_bad_frame(case_file: Path, served):
    ns, ex = served
    case = json.loads(case_file.read_text())
    assert set(case) <= {
        "description",
        "expect",
        "raw_text",
        "header",
        "env_text",
        "env_base64",
        "body_text",
        "cut",
        "fds",
    }, f"{case_file.name}: unknown keys"
    data, nfds = _frame(case)
    fds = [os.open("/proc/self/ns/net", os.O_RDONLY)] + [
        os.open(os.devnull, os.O_RDONLY) for _ in range(max(0, nfds - 1))
    ]
    fds = fds[:nfds]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    try:
        sock.connect(ex.socket)
        if data:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            sock.sendmsg([data[:1]], anc if fds else [])
            sock.sendall(data[1:])
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    finally:
        sock.close()
        for fd in fds:
            os.close(fd)
    magic, version, kind, status, size = front.RESPONSE.unpack(reply[: front.RESPONSE.size])
    assert magic == front.MAGIC and version == front.VERSION
    reason = reply[front.RESPONSE.size :].decode()
    assert len(reason) == size
    want = {"refused": front.REFUSED, "mismatch": front.MISMATCH}[case["expect"]["kind"]]
    assert kind == want, f"{case['description']}: kind {kind}, {reason!r}"
    assert case["expect"]["fragment"] in reason, f"{case['expect']['fragment']!r} not in {reason!r}"
    _still_serving(ns, ex)
