"""Write local stand-ins for the tools Pants 2.17 downloads from GitHub / binaries.pantsbuild.org.

Run by ./pants with the Pants venv's Python: `python pants_offline_tools.py OUTDIR PEX_VERSION`.
Every file is byte-for-byte reproducible, so pants.toml pins each sha256 and size (printed to
stderr here, in the `known_versions` format).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def write(out: str, name: str, data: bytes) -> None:
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, os.path.join(out, name))


def exec_script(target: str) -> bytes:
    return f'#!/bin/sh\nexec {target} "$@"\n'.encode()


def build_pex_pex(out: str, pex_version: str) -> None:
    """[pex-cli]: the Pex PEX, built from PyPI's pex with the flags Pex's own release uses.

    --no-strip-pex-env matters: without it Pex ignores Pants' PEX_ROOT and caches in ~/.pex.
    """
    pex_out = os.path.join(out, f"pex-v{pex_version}.pex")
    cert = ["--cert", CA_BUNDLE] if os.path.exists(CA_BUNDLE) else []
    subprocess.run(
        [sys.executable, "-m", "pex", f"pex=={pex_version}", *cert, "--disable-cache",
         "--no-build", "--no-compile", "--no-use-system-time", "--python-shebang",
         "/usr/bin/env python", "--no-strip-pex-env", "--include-tools", "-c", "pex",
         "-o", pex_out + ".tmp"],
        check=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    os.replace(pex_out + ".tmp", pex_out)


def main() -> int:
    out, pex_version = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    build_pex_pex(out, pex_version)

    # [protoc]: Pants runs ./bin/protoc out of an archive; use Debian's protobuf-compiler.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        data = exec_script("/usr/bin/protoc")
        info = tarfile.TarInfo("bin/protoc")
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tf.addfile(info, io.BytesIO(data))
    write(out, "protoc-debian.tar", buf.getvalue())

    # [grpc-python-plugin]: a plain executable; use Debian's protobuf-compiler-grpc.
    write(out, "grpc_python_plugin-debian", exec_script("/usr/bin/grpc_python_plugin"))

    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        print(f"{name}|{hashlib.sha256(data).hexdigest()}|{len(data)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
