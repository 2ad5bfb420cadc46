"""Pool config: parsing, normalisation, every kind of bad input, and pool assignment."""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any, Dict

import pytest
import yaml

from virtcore import pools
from virtcore.discovery import Nic


def parse(text: str) -> pools.Config:
    return pools.parse_config(textwrap.dedent(text), "pools.yaml")


def nic(pci: str, **kw) -> Nic:
    base: Dict[str, Any] = dict(
        pci_address=pci,
        virtio_name="virtio0",
        driver="virtio_net",
        vendor="0x1af4",
        device="0x1041",
        numa_node=-1,
        ifname=None,
        ifindex=None,
        mac=None,
        mtu=None,
        operstate=None,
        carrier=None,
        admin_up=None,
        visible=False,
        default_route=False,
        eligible=True,
        excluded_reason=None,
        problems=(),
    )
    base.update(kw)
    return Nic(**base)


def test_embedded_default_is_one_virtio_net_pool():
    cfg = pools.load_config(None)
    assert cfg.source == "<embedded default>"
    assert cfg.pools == (
        pools.Pool(pools.DEFAULT_RESOURCE, pools.Selectors(drivers=("virtio_net",))),
    )
    assert pools.DEFAULT_RESOURCE == "kernel.org/virt"


def test_full_config_is_normalised():
    cfg = parse("""
        pools:
          - resourceName: example.com/fast
            selectors:
              drivers: [virtio_net]
              vendors: ["1AF4"]
              devices: ["1000", "0x1041", "0X1041"]
              pciAddresses: ["0000:00:0A.0", "01:00.0"]
              ifNames: [eth1]
              macs: ["52:54:00:AB:CD:EF", "52-54-00-12-34-56"]
          - resourceName: kernel.org/virt
        """)
    fast, rest = cfg.pools
    assert fast.resource_name == "example.com/fast"
    assert fast.selectors == pools.Selectors(
        drivers=("virtio_net",),
        vendors=("0x1af4",),
        devices=("0x1000", "0x1041"),
        pci_addresses=("0000:00:0a.0", "0000:01:00.0"),
        if_names=("eth1",),
        macs=("52:54:00:ab:cd:ef", "52:54:00:12:34:56"),
    )
    assert rest == pools.Pool("kernel.org/virt", pools.Selectors())
    assert cfg.source == "pools.yaml"


def test_load_config_reads_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pools:\n  - resourceName: a.example/b\n")
    cfg = pools.load_config(str(path))
    assert cfg.source == str(path) and cfg.pools[0].resource_name == "a.example/b"


BAD = [
    ("pools: [\n", "line 2, column 1", "not valid YAML"),
    ("pools: []\npools: []\n", "line 2, column 1", "duplicate key 'pools'"),
    ("", "(top level)", "empty"),
    ("- pools\n", "(top level)", "is a list"),
    ("pool: []\n", "pool", "unknown key"),
    ("{}\n", "pools", "missing"),
    ("pools: {}\n", "pools", "is a mapping"),
    ("pools: []\n", "pools", "empty list"),
    ("pools: [kernel.org/virt]\n", "pools[0]", "is a string"),
    ("pools:\n  - selectors: {}\n", "pools[0].resourceName", "missing"),
    ("pools:\n  - resourceName: 7\n", "pools[0].resourceName", "is an integer"),
    ("pools:\n  - resourceName: virt\n", "pools[0].resourceName", "not <domain>/<name>"),
    ("pools:\n  - resourceName: Kernel.org/virt\n", "pools[0].resourceName", "DNS domain"),
    ("pools:\n  - resourceName: a.org/" + "x" * 64 + "\n", "pools[0].resourceName", "63"),
    (
        "pools:\n  - resourceName: a.org/x\n  - resourceName: a.org/x\n",
        "pools[1].resourceName",
        "duplicate resource name 'a.org/x' (also pools[0])",
    ),
    ("pools:\n  - resourceName: a.org/x\n    extra: 1\n", "pools[0].extra", "unknown key"),
    ("pools:\n  - resourceName: a.org/x\n    selectors: []\n", "pools[0].selectors", "is a list"),
    (
        "pools:\n  - resourceName: a.org/x\n    selectors: {vendor: ['1af4']}\n",
        "pools[0].selectors.vendor",
        "unknown key",
    ),
    (
        "pools:\n  - resourceName: a.org/x\n    selectors: {vendors: '1af4'}\n",
        "pools[0].selectors.vendors",
        "is a string",
    ),
    (
        "pools:\n  - resourceName: a.org/x\n    selectors: {vendors: []}\n",
        "pools[0].selectors.vendors",
        "empty list",
    ),
    (
        "pools:\n  - resourceName: a.org/x\n    selectors: {vendors: [0x1af4]}\n",
        "pools[0].selectors.vendors[0]",
        "YAML read it as a number",
    ),
    (
        "pools:\n  - resourceName: a.org/x\n    selectors: {devices: ['1041', 'zz']}\n",
        "pools[0].selectors.devices[1]",
        "not a 4-digit hex ID",
    ),
    (
        "pools:\n  - resourceName: a.org/x\n    selectors: {pciAddresses: ['0000:00:20.0']}\n",
        "pools[0].selectors.pciAddresses[0]",
        "not a PCI address",
    ),
    (
        "pools:\n  - resourceName: a.org/x\n    selectors: {macs: ['52:54:00:12:34']}\n",
        "pools[0].selectors.macs[0]",
        "not a MAC address",
    ),
    (
        "pools:\n  - resourceName: a.org/x\n    selectors: {macs: [52:54:00:12:34:56]}\n",
        "pools[0].selectors.macs[0]",
        "YAML read it as a number",
    ),
    (
        "pools:\n  - resourceName: a.org/x\n    selectors: {ifNames: [averyveryverylongname]}\n",
        "pools[0].selectors.ifNames[0]",
        "not an interface name",
    ),
    (
        "pools:\n  - resourceName: a.org/x\n    selectors: {drivers: [null]}\n",
        "pools[0].selectors.drivers[0]",
        "is nothing (null)",
    ),
]


@pytest.mark.parametrize("text,key_path,problem", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_config_names_file_key_path_and_expectation(text, key_path, problem):
    with pytest.raises(pools.ConfigError) as err:
        pools.parse_config(text, "/etc/virtdp/pools.yaml")
    e = err.value
    assert e.source == "/etc/virtdp/pools.yaml"
    assert e.key_path == key_path
    assert problem in e.problem
    assert str(e) == f"/etc/virtdp/pools.yaml: {key_path}: {e.problem}, expected {e.expected}"
    assert e.expected


def test_unreadable_and_non_utf8_files(tmp_path):
    absent = tmp_path / "absent.yaml"
    with pytest.raises(pools.ConfigError) as e:
        pools.load_config(str(absent))
    # The whole message, so that its wording cannot drift ("expected readable a YAML file").
    assert str(e.value) == (
        f"{absent}: (top level): cannot read the file (No such file or directory), "
        "expected a readable YAML file"
    )
    with pytest.raises(pools.ConfigError, match="cannot read the file"):
        pools.load_config(str(tmp_path))  # a directory
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"pools: \xff\xfe\n")
    with pytest.raises(pools.ConfigError) as e:
        pools.load_config(str(binary))
    assert str(e.value).startswith(f"{binary}: (top level): not UTF-8 text (")
    assert str(e.value).endswith("), expected a UTF-8 YAML file")


def test_schema_describes_every_key_and_its_examples_validate():
    paths = [k.path for k in pools.SCHEMA]
    assert paths == [
        "pools",
        "pools[].resourceName",
        "pools[].selectors",
        "pools[].selectors.drivers",
        "pools[].selectors.vendors",
        "pools[].selectors.devices",
        "pools[].selectors.pciAddresses",
        "pools[].selectors.ifNames",
        "pools[].selectors.macs",
    ]
    for k in pools.SCHEMA:
        assert k.type and k.description and k.example is not None
        assert k.required == (k.path in ("pools", "pools[].resourceName"))
    # A config made of the schema's own examples is valid: docs cannot show a rejected value.
    selectors = {
        k.path.rsplit(".", 1)[1]: k.example
        for k in pools.SCHEMA
        if k.path.startswith("pools[].selectors.")
    }
    doc = {"pools": [{"resourceName": "kernel.org/virt", "selectors": selectors}]}
    cfg = pools.parse_config(yaml.safe_dump(doc), "examples")
    assert cfg.pools[0].selectors.pci_addresses == ("0000:00:0a.0",)
    rows = pools.schema_rows()
    assert [r["path"] for r in rows] == paths
    assert set(rows[0]) == {"path", "type", "required", "default", "description", "example"}


def test_assign_first_matching_pool_wins_and_ineligible_get_none():
    cfg = parse("""
        pools:
          - resourceName: example.com/legacy
            selectors: {devices: ["1000"]}
          - resourceName: example.com/picked
            selectors: {pciAddresses: ["0000:00:0c.0"], macs: ["52:54:00:00:00:0c"]}
          - resourceName: example.com/rest
            selectors: {drivers: [virtio_net]}
        """)
    nics = [
        nic("0000:00:0a.0", device="0x1000"),
        nic("0000:00:0b.0"),
        nic("0000:00:0c.0", mac="52:54:00:00:00:0C"),
        nic("0000:00:0d.0", mac="52:54:00:00:00:0d"),
        nic("0000:00:0e.0", eligible=False, excluded_reason="carries the IPv4 default route"),
        nic("0000:00:0f.0", driver="other_driver"),
        nic("0000:00:10.0", device="0x1000", eligible=False, excluded_reason="no driver"),
    ]
    out = pools.assign(cfg, nics)
    assert [n.pool for n in out] == [
        "example.com/legacy",
        "example.com/rest",
        "example.com/picked",
        "example.com/rest",
        None,
        None,
        None,
    ]
    # Copies: the inputs are untouched and everything else is kept.
    assert all(n.pool is None for n in nics)
    assert [dataclasses.replace(n, pool=None) for n in out] == nics


def test_if_name_selector_matches_only_visible_nics():
    cfg = parse("pools:\n  - resourceName: example.com/eth1\n    selectors: {ifNames: [eth1]}\n")
    here, away = pools.assign(
        cfg, [nic("0000:00:0a.0", ifname="eth1", visible=True), nic("0000:00:0b.0")]
    )
    assert here.pool == "example.com/eth1" and away.pool is None
