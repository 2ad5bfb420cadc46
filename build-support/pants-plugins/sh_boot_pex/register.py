"""`sh_boot_pex`: package a `pex_binary` again with a /bin/sh launcher and a fixed runtime PEX_ROOT.

Pants 2.17.1's `pex_binary` cannot pass `--sh-boot` or `--runtime-pex-root` to Pex (later Pants
releases added `sh_boot` and `extra_build_args`). This target takes the PEX that its `pex_binary`
builds, so Pants still picks the sources, the locked requirements and the interpreter
constraints, and rebuilds it with the same Pex (`[pex-cli]`): requirements come only from that
PEX (`--pex-repository`, no index), sources and PEX-INFO settings are carried over, and the
launcher flags are added. The result is what `package` writes and what tests'
`runtime_package_dependencies` put in their sandbox: the shipped file, byte for byte.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass

from pants.backend.python.goals.package_pex_binary import PexBinaryFieldSet
from pants.backend.python.util_rules.pex_cli import PexCliProcess
from pants.core.goals.package import (
    BuiltPackage,
    BuiltPackageArtifact,
    EnvironmentAwarePackageRequest,
    OutputPathField,
    PackageFieldSet,
)
from pants.engine.addresses import UnparsedAddressInputs
from pants.engine.fs import CreateDigest, Digest, DigestContents, FileContent, MergeDigests
from pants.engine.process import ProcessResult
from pants.engine.rules import Get, collect_rules, rule
from pants.engine.target import (
    COMMON_TARGET_FIELDS,
    AsyncFieldMixin,
    FieldSetsPerTarget,
    FieldSetsPerTargetRequest,
    InvalidFieldException,
    StringField,
    Target,
    Targets,
)
from pants.engine.unions import UnionRule
from pants.util.logging import LogLevel

# Zip entries of a PEX that belong to Pex itself, not to the application.
_PEX_OWN = (".bootstrap/", ".deps/", "__pex__/", "__main__.py", "PEX-INFO")
_SRC = "__sh_boot_pex_sources"


class ShBootPexBinaryField(StringField, AsyncFieldMixin):
    alias = "pex"
    required = True
    help = "Address of the `pex_binary` target to rebuild, e.g. `:ehost-device-no-sh-boot`."

    def to_unparsed_address_inputs(self) -> UnparsedAddressInputs:
        return UnparsedAddressInputs(
            [self.value] if self.value else [],
            owning_address=self.address,
            description_of_origin=f"the `{self.alias}` field of {self.address}",
        )


class ShBootPexRuntimeRootField(StringField):
    alias = "runtime_pex_root"
    required = True
    help = (
        "Where the PEX caches its unpacked venv at run time when PEX_ROOT is not set (Pex's "
        "--runtime-pex-root). Needed where the runtime gives no HOME."
    )


class ShBootPexTarget(Target):
    alias = "sh_boot_pex"
    core_fields = (
        *COMMON_TARGET_FIELDS,
        ShBootPexBinaryField,
        ShBootPexRuntimeRootField,
        OutputPathField,
    )
    help = (
        "A `pex_binary` rebuilt with Pex's /bin/sh launcher (--sh-boot) and a fixed runtime "
        "PEX_ROOT. Set `shebang` on the `pex_binary` to an absolute interpreter path so the "
        "launcher works with an empty environment (no PATH)."
    )


@dataclass(frozen=True)
class ShBootPexFieldSet(PackageFieldSet):
    required_fields = (ShBootPexBinaryField, ShBootPexRuntimeRootField)

    pex: ShBootPexBinaryField
    runtime_pex_root: ShBootPexRuntimeRootField
    output_path: OutputPathField


def _rebuild_args(pex_info: dict, shebang: str, in_path: str) -> list[str]:
    """Pex flags that reproduce the PEX-INFO settings of `in_path` (what pex_binary can set)."""
    args = ["--pex-repository", in_path, *pex_info.get("requirements", []), "-D", _SRC]
    if pex_info.get("entry_point"):
        args += ["--entry-point", pex_info["entry_point"]]
    for ic in pex_info.get("interpreter_constraints", []):
        args += ["--interpreter-constraint", ic]
    args += [f"--inject-args={a}" for a in pex_info.get("inject_args", [])]
    args += [f"--inject-env={k}={v}" for k, v in sorted(pex_info.get("inject_env", {}).items())]
    if not pex_info.get("strip_pex_env", True):
        args.append("--no-strip-pex-env")
    if pex_info.get("inherit_path", "false") != "false":
        args.append(f"--inherit-path={pex_info['inherit_path']}")
    if pex_info.get("venv"):
        bin_path = pex_info.get("venv_bin_path", "false")
        args += ["--venv", bin_path] if bin_path in ("prepend", "append") else ["--venv"]
    for key, flag, when in (
        ("emit_warnings", "--no-emit-warnings", False),
        ("ignore_errors", "--ignore-errors", True),
        ("includes_tools", "--include-tools", True),
        ("venv_site_packages_copies", "--venv-site-packages-copies", True),
        ("venv_hermetic_scripts", "--non-hermetic-venv-scripts", False),
    ):
        if key in pex_info and pex_info[key] is when:
            args.append(flag)
    if shebang:
        args += ["--python-shebang", shebang]
    return args


@rule(desc="Rebuild a PEX with a /bin/sh launcher", level=LogLevel.DEBUG)
async def package_sh_boot_pex(field_set: ShBootPexFieldSet) -> BuiltPackage:
    targets = await Get(Targets, UnparsedAddressInputs, field_set.pex.to_unparsed_address_inputs())
    per_target = await Get(FieldSetsPerTarget, FieldSetsPerTargetRequest(PackageFieldSet, targets))
    field_sets = [fs for fs in per_target.field_sets if isinstance(fs, PexBinaryFieldSet)]
    if len(targets) != 1 or len(field_sets) != 1:
        raise InvalidFieldException(
            f"The `pex` field of {field_set.address} must name exactly one `pex_binary` target, "
            f"got {[str(t.address) for t in targets]}."
        )
    inner = await Get(BuiltPackage, EnvironmentAwarePackageRequest(field_sets[0]))
    in_path = inner.artifacts[0].relpath
    assert in_path is not None
    (in_pex,) = (c for c in await Get(DigestContents, Digest, inner.digest) if c.path == in_path)

    first_line = in_pex.content.split(b"\n", 1)[0].decode()
    shebang = first_line[2:].strip() if first_line.startswith("#!") else ""
    with zipfile.ZipFile(io.BytesIO(in_pex.content)) as zf:
        pex_info = json.loads(zf.read("PEX-INFO"))
        sources = [
            FileContent(f"{_SRC}/{name}", zf.read(name))
            for name in zf.namelist()
            if not name.startswith(_PEX_OWN) and not name.endswith("/")
        ]
    sources_digest = await Get(Digest, CreateDigest(sources))
    input_digest = await Get(Digest, MergeDigests([inner.digest, sources_digest]))

    output_path = field_set.output_path.value_or_default(file_ending="pex")
    if output_path == in_path:
        raise InvalidFieldException(
            f"{field_set.address} and its `pex_binary` both write {output_path}: give the "
            "`pex_binary` another `output_path`."
        )
    result = await Get(
        ProcessResult,
        PexCliProcess(
            subcommand=(),
            extra_args=(
                *_rebuild_args(pex_info, shebang, in_path),
                "--sh-boot",
                f"--runtime-pex-root={field_set.runtime_pex_root.value}",
                "--output-file",
                output_path,
            ),
            description=f"Rebuilding {in_path} as {output_path} with a /bin/sh launcher",
            additional_input_digest=input_digest,
            output_files=(output_path,),
        ),
    )
    (out_pex,) = await Get(DigestContents, Digest, result.output_digest)
    fast = _literal_root(_direct_entry(out_pex.content, pex_info), field_set.runtime_pex_root.value)
    digest = await Get(Digest, CreateDigest([FileContent(output_path, fast, is_executable=True)]))
    return BuiltPackage(digest, (BuiltPackageArtifact(output_path),))


# The warm path of Pex's launcher: exec the venv's python on the venv directory, whose
# __main__.py (Pex's) reads PEX_* variables, imports `site`, then runs the entry point through
# runpy: ~5 ms of a ~17 ms VERSION call here. The launcher is rewritten to call the entry point
# directly with `-I -S` and the venv's site-packages on sys.path (what `site` would add).
_WARM_EXEC = b'''    exec "${INSTALLED_PEX}/bin/python" ${VENV_PYTHON_ARGS} "${INSTALLED_PEX}" \\
        "$@"'''


def _direct_entry(content: bytes, pex_info: dict) -> bytes:
    """`content` with its launcher's warm exec calling the entry point directly; unchanged when
    the PEX is not a plain venv-mode PEX with a `module:function` entry point. The zip part is
    untouched: zip readers (zipimport, zipfile) find it from its end, whatever comes before."""
    entry = pex_info.get("entry_point") or ""
    plain = not pex_info.get("inject_args") and not pex_info.get("inject_env")
    if not pex_info.get("venv") or ":" not in entry or not plain or _WARM_EXEC not in content:
        return content
    module, func = entry.split(":", 1)
    code = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); "
        f"from {module} import {func} as main; sys.exit(main())"
    )
    warm = (
        '    for _sp in "${INSTALLED_PEX}"/lib/python3*/site-packages; do :; done\n'
        f'    exec "${{INSTALLED_PEX}}/bin/python" -I -S -c \'{code}\' "${{_sp}}" "$@"'
    ).encode()
    return content.replace(_WARM_EXEC, warm, 1)


def _literal_root(content: bytes, root: str) -> bytes:
    """`content` with its launcher's default PEX_ROOT set as a literal when it is an absolute
    path of plain characters: Pex writes `$(echo ROOT)` for tilde expansion, a command
    substitution that costs /bin/sh a fork (~0.2 ms of every call) to expand nothing."""
    if not root.startswith("/") or not all(c.isalnum() or c in "/._-" for c in root):
        return content
    return content.replace(
        f'DEFAULT_PEX_ROOT="$(echo {root})"'.encode(), f'DEFAULT_PEX_ROOT="{root}"'.encode(), 1
    )


def target_types():
    return [ShBootPexTarget]


def rules():
    return [
        *collect_rules(),
        UnionRule(PackageFieldSet, ShBootPexFieldSet),
    ]
