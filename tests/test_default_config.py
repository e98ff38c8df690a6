"""The shipped default settings file (kvgate/default.toml) lists exactly the settings the code has: every EngineConfig field in
[engine] and every ServerConfig field in [server], each with the code's default (a setting whose default is None
as a commented-out `# name = ...` line, TOML having no null), no unknown names, and the allowed values the code
accepts."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

from engine.config import DTYPES, LOAD_FORMATS, EngineConfig
from engine.layers.attention_backends import BACKEND_NAMES
from gateway.config import ServerConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ROOT / "kvgate" / "default.toml"
TABLES = {"engine": EngineConfig, "server": ServerConfig}
NESTED = {"engine"}  # ServerConfig.engine is the [engine] table, not a setting of [server]
# settings whose comment starts with their allowed values, `a | b | c`, and the code's list of them
CHOICES = {"dtype": DTYPES, "load_format": LOAD_FORMATS, "attention_backend": ("auto", *BACKEND_NAMES)}

_TABLE = re.compile(r"^\[(\w+)\]\s*$")
_COMMENTED = re.compile(r"^#\s*(\w+)\s*=")
_KEY = re.compile(r"^(\w+)\s*=[^#]*#\s*(.*)$")


def sections() -> dict[str, dict]:
    """Per table: its keys with values (TOML), commented-out names, and each line's trailing comment."""
    text = DEFAULTS.read_text()
    parsed = tomllib.loads(text)
    out = {name: {"values": parsed.get(name, {}), "commented": set(), "comments": {}} for name in parsed}
    table = None
    for line in text.splitlines():
        if m := _TABLE.match(line):
            table = out[m.group(1)]
        elif table is not None and (m := _COMMENTED.match(line)):
            table["commented"].add(m.group(1))
        elif table is not None and (m := _KEY.match(line)):
            table["comments"][m.group(1)] = m.group(2)
    return out


def defaults(cls) -> dict:
    fields = [f for f in dataclasses.fields(cls) if f.name not in NESTED]
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default for f in fields}


def test_it_has_exactly_the_tables_of_the_code():
    assert set(sections()) == set(TABLES), f"{DEFAULTS}: tables {sorted(sections())}, expected {sorted(TABLES)}"


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_setting_is_listed_with_the_codes_default(table):
    section, expected = sections()[table], defaults(TABLES[table])
    unset = {name for name, value in expected.items() if value is None}
    values, commented = section["values"], section["commented"]
    where = f"{DEFAULTS.name} [{table}]"
    assert not set(values) - set(expected), f"{where}: unknown settings {sorted(set(values) - set(expected))}"
    odd = sorted(commented - unset)
    assert not odd, f"{where}: commented out, yet not settings defaulting to None: {odd}"
    missing = set(expected) - set(values) - commented
    assert not missing, f"{where}: settings missing: {sorted(missing)}"
    assert not unset - commented, f"{where}: default None, so write `# name = ...`: {sorted(unset - commented)}"
    wrong = {k: (v, expected[k]) for k, v in values.items() if v != expected[k]}
    assert not wrong, f"{where}: (file, code) defaults differ: {wrong}"


def test_the_file_loads_as_the_defaults():
    assert EngineConfig.from_toml(DEFAULTS) == EngineConfig()
    assert ServerConfig.from_toml(DEFAULTS) == ServerConfig()


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_allowed_values_are_the_codes(name):
    comment = sections()["engine"]["comments"][name]
    listed = [part.split()[0] for part in comment.split(";")[0].split("|")]  # "a | b (note) | c; more"
    assert listed == list(CHOICES[name]), f"{name}: the comment lists {listed}, the code accepts {CHOICES[name]}"


@pytest.mark.parametrize("example", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_load(example):
    ServerConfig.from_toml(example, EngineConfig.from_toml(example))
