"""virtcore.yamlsubset, the stdlib reader ehost-device uses for the node policy and the pool
config: on every document it accepts it must agree with PyYAML's SafeLoader (which the other
tools use), and what it does not take it refuses with the line, never a guess."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from virtcore import pools, yamlsubset

ROOT = Path(__file__).resolve().parents[2]


def _corpus_configs():
    out = []
    for path in sorted((ROOT / "tests" / "corpus" / "pools").glob("*.yaml")):
        try:
            case = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(case, dict) and isinstance(case.get("config"), str):
            out.append(pytest.param(case["config"], id=path.stem))
    configmap = yaml.safe_load((ROOT / "deployments" / "virtdp-config.yaml").read_text())
    for key, text in configmap["data"].items():
        out.append(pytest.param(text, id=f"configmap-{key}"))
    out.append(pytest.param(pools.DEFAULT_CONFIG_YAML, id="default-config"))
    return out


SAMPLES = [
    "a: [1, 'x, y', \"q\"]\nb: {}\nc: []\n",
    "k: \"tab\\there \\u00e9\"\n's': 'it''s'\n",
    "bools: [yes, No, on, OFF, true, False]\nnulls: [~, null, ]\n",
    "ints: [0x1af4, 0o17, 017, 1_000, -5, +3, 1:30, 0b101, 0]\n",
    "floats: [1.5, 1.5e+3, .5, .inf, -.Inf, 1:30.5]\nstrings: [1.5e3, 08, 1e5, 0x]\n",
    "macs: [52:54:00:12:34:56, '52:54:00:12:34:56']\n",
    "top:\n  nested:\n    - a: 1\n      b: [x]\n    -\n      c: d\n  after: 2\n",
    "list:\n- 1\n- - 2\n  - 3\n",
    "url: http://example.com/a#b # a comment\n# whole-line comment\n",
    "---\nkey: value\n...\n",
    "colon: a:b\nspaced key: v\n'quoted key': 1\n",
    "- just\n- a list\n",
    "scalar\n",
    "",
    "# only a comment\n",
    "\ufeffbom: 1\n",
]


@pytest.mark.parametrize("text", _corpus_configs() + SAMPLES)
def test_agrees_with_pyyaml(text):
    try:  # PyYAML's SafeLoader as the tools use it: a duplicate key is refused
        expected = pools.load_document(text, "f.yaml")
    except pools.ConfigError:
        with pytest.raises(yamlsubset.YamlError):
            yamlsubset.load(text)
        return
    assert yamlsubset.load(text) == expected
    assert repr(yamlsubset.load(text)) == repr(expected)  # int vs bool vs float too


@pytest.mark.parametrize(
    "text,line,word",
    [
        ("a: &x 1\nb: *x\n", 1, "anchors"),
        ("a: !!str 1\n", 1, "tags"),
        ("a: |\n  text\n", 1, "block scalars"),
        ("a: >\n  text\n", 1, "block scalars"),
        ("a: one\n  two\n", 2, "indentation"),
        ("a: 1\na: 2\n", 2, "duplicate key"),
        ("a: [1, 2\n", 1, "not closed"),
        ("a: 'open\n", 1, "not closed"),
        ("a: 1\n---\nb: 2\n", 2, "more than one"),
        ("a:\n\t- x\n", 2, "tab"),
        ("? complex\n: v\n", 1, "complex keys"),
        ('a: "\\q"\n', 1, "unknown escape"),
        ("%YAML 1.1\n---\na: 1\n", 1, "directives"),
    ],
)
def test_refuses_what_it_does_not_read_with_the_line(text, line, word):
    with pytest.raises(yamlsubset.YamlError) as e:
        yamlsubset.load(text)
    assert e.value.line == line and word in str(e.value), str(e.value)


def test_pool_config_read_either_way_is_the_same_config():
    for param in _corpus_configs():
        (text,) = param.values
        results = []
        for reader in ("pyyaml", "subset"):
            try:
                results.append(pools.parse_config(text, "f.yaml", reader=reader))
            except pools.ConfigError as e:
                if e.problem.startswith("not valid YAML"):  # the two place the error apart
                    results.append(("error", "not valid YAML"))
                else:
                    results.append(("error", e.key_path, e.problem))
        assert results[0] == results[1], param.id
