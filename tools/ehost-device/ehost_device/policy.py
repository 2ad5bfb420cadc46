"""The node's own settings for ehost-device: a YAML file on the node, never the network config.

A network config is written by whoever may create a NetworkAttachmentDefinition, so every key in
it is tenant input; the plugin runs as root in the host's namespaces. What touches the host's
files or decides which NICs may leave it comes from here: the log file, the sysfs tree, the
executor socket, and which NICs may be taken. The file is `/etc/virtdp/ehost-device.yaml`
(written by the virtdp DaemonSet from its ConfigMap); only the plugin's environment, which the
runtime controls, can name another (`EHOST_DEVICE_POLICY`).

`SCHEMA` drives validation (virtcore.schema) and docs/policy-reference.md. The file is read
with virtcore.yamlsubset: ehost-device ships no PyYAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from ehost_device import DEFAULT_SOCKET as DEFAULT_SOCKET
from virtcore import pools
from virtcore.schema import ConfigError, Invalid, Key, Walker

ENV = "EHOST_DEVICE_POLICY"
DEFAULT_PATH = "/etc/virtdp/ehost-device.yaml"

DEFAULT_POOL_CONFIG = "/etc/virtdp/config.yaml"
# virtcore.claims.DEFAULT_DIR; spelled out here so that loading the policy does not import it.
DEFAULT_DRA_STATE_DIR = "/var/lib/virtdp/dra"
LOG_LEVELS = ("error", "warning", "info", "debug")


def _absolute(value: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise Invalid(f"{value!r} is not an absolute path", "an absolute path such as /var/log/x")
    return value


def _socket(value: str) -> str:
    return value if value == "" else _absolute(value)


def _level(value: str) -> str:
    if value not in LOG_LEVELS:
        raise Invalid(f"{value!r} is not a log level", f"one of {', '.join(LOG_LEVELS)}")
    return value


SCHEMA: Tuple[Key, ...] = (
    Key(
        "sysfsRoot",
        "string",
        False,
        "/sys",
        "The sysfs tree the plugin resolves PCI addresses and netdevs in (tests: a fake tree).",
        "/sys",
        _absolute,
    ),
    Key(
        "logFile",
        "string",
        False,
        None,
        "Absolute path of a log file the plugin appends to (created 0600; must be a regular "
        "file, never followed through a symlink). Absent: log to stderr only, which the runtime "
        "collects.",
        "/var/log/virtdp/ehost-device.log",
        _absolute,
    ),
    Key(
        "logLevel",
        "string",
        False,
        "info",
        "Log level when the network config sets none: error, warning, info or debug.",
        "info",
        _level,
    ),
    Key(
        "executorSocket",
        "string",
        False,
        DEFAULT_SOCKET,
        "Unix socket of the warm executor (`ehost-device serve`); an empty string turns the "
        "executor off. The environment variable EHOST_DEVICE_SOCKET, when set, wins.",
        DEFAULT_SOCKET,
        _socket,
    ),
    Key(
        "allowedPools",
        "list of strings",
        False,
        [],
        "Only NICs in these pools of `poolConfig` may be taken. Absent: every NIC virtdp's "
        "discovery calls eligible: a virtio_net NIC the node does not use itself (no default "
        "route, no address the node routes with), the rule virtdp-serve advertises by. The "
        "node's own NICs are refused either way.",
        ["kernel.org/virt"],
        pools.check_resource_name,
    ),
    Key(
        "poolConfig",
        "string",
        False,
        DEFAULT_POOL_CONFIG,
        "The virtdp pool config (the file virtdp-serve reads) that `allowedPools` refers to.",
        DEFAULT_POOL_CONFIG,
        _absolute,
    ),
    Key(
        "draStateDir",
        "string",
        False,
        DEFAULT_DRA_STATE_DIR,
        "Directory of virtdp-serve's DRA record (its `--dra-state-dir`): the plugin reads "
        "`claims.json` there to find a pod's claimed NICs when the network config names no "
        "device, and writes each plumbed NIC's network status under `status/`.",
        DEFAULT_DRA_STATE_DIR,
        _absolute,
    ),
)


@dataclass(frozen=True)
class Policy:
    source: str  # the file, or a note that the built-in defaults apply
    sysfs_root: str = "/sys"
    log_file: Optional[str] = None
    log_level: str = "info"
    executor_socket: str = DEFAULT_SOCKET
    allowed_pools: Tuple[str, ...] = ()
    pool_config: str = DEFAULT_POOL_CONFIG
    dra_state_dir: str = DEFAULT_DRA_STATE_DIR


DEFAULTS = Policy(source=f"built-in defaults ({DEFAULT_PATH} is absent)")


def location(environ: Mapping[str, str]) -> Tuple[str, bool]:
    """(the policy file's path, whether the environment named it)."""
    if ENV in environ:
        return environ[ENV], True
    return DEFAULT_PATH, False


def load(environ: Mapping[str, str]) -> Policy:
    """The node policy. An absent default file means the built-in defaults; a file the
    environment names must exist. Raises ConfigError naming the file and the key."""
    path, named = location(environ)
    if not path.startswith("/"):
        raise ConfigError(
            f"{ENV}={path!r}", "(environment)", "is not an absolute path", "the policy file's path"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except FileNotFoundError:
        if not named:
            return DEFAULTS
        raise ConfigError(
            path, "(top level)", f"the file does not exist ({ENV} names it)", "a YAML file"
        ) from None
    except OSError as e:
        raise ConfigError(
            path, "(top level)", f"cannot read the file ({e.strerror or e})", "a readable YAML file"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            path, "(top level)", f"not UTF-8 text ({e.reason})", "a UTF-8 YAML file"
        ) from None
    return parse(text, path)


def parse(text: str, source: str) -> Policy:
    doc: Any = pools.load_document(text, source, reader="subset")
    if doc is None:  # an empty file: every default
        return Policy(source=source)
    walker = Walker(SCHEMA, source)
    top = walker.mapping(doc, "", "")
    values: dict = {"source": source}
    names = {
        "sysfsRoot": "sysfs_root",
        "logFile": "log_file",
        "logLevel": "log_level",
        "executorSocket": "executor_socket",
        "poolConfig": "pool_config",
        "draStateDir": "dra_state_dir",
    }
    for key, value in top.items():
        schema_key = walker.by_path[key]
        if key == "allowedPools":
            values["allowed_pools"] = walker.strings(value, schema_key, key)
        else:
            values[names[key]] = walker.string(value, schema_key, key)
    return Policy(**values)


def pool_config(p: Policy, *, text: Optional[str] = None) -> pools.Config:
    """The pool config `allowedPools` refers to; every allowed pool must be in it. `text` stands
    in for the file's content (the installer checks a pair before it installs them). Raises
    ConfigError."""
    if text is None:
        text = pools.read_text(p.pool_config)
    config = pools.parse_config(text, p.pool_config, reader="subset")
    names = [pool.resource_name for pool in config.pools]
    for i, name in enumerate(p.allowed_pools):
        if name not in names:
            raise ConfigError(
                p.source,
                f"allowedPools[{i}]",
                f"{name!r} is not a pool of {p.pool_config}",
                f"one of {names}",
            )
    return config
