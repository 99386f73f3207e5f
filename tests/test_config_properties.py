"""Property tests of the run config: any mutation of a valid config either validates or
raises ConfigError naming the field; overrides round-trip through `--set` syntax."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import TINY_CONFIG
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mates.config import RunConfig, apply_overrides, config_from_dict, parse_override
from mates.errors import ConfigError

BASE_DIR = Path("/srv/mates")  # resolution only: nothing is read from it
VALID = RunConfig.model_validate(
    yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
).model_dump(mode="json")
SECTIONS = sorted(k for k, v in VALID.items() if isinstance(v, dict))
FIELDS = sorted(
    [(s, f) for s in SECTIONS for f in VALID[s]] + [(k,) for k in VALID if k not in SECTIONS]
)
PROPERTY = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# NUL is left out of generated text; a NUL in a data path has its own test at the end.
text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    text,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=6,
)


def _copy() -> dict[str, Any]:
    return json.loads(json.dumps(VALID))


def _check(raw: dict[str, Any], named: str) -> RunConfig | None:
    """Validates, or fails with ConfigError naming `named`; any other exception fails."""
    try:
        return config_from_dict(raw, base_dir=BASE_DIR)
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith("invalid config: ") and named in msg, (named, msg)
        return None


def test_the_tiny_config_is_valid():
    assert config_from_dict(_copy(), base_dir=BASE_DIR).name == "tiny"
    assert len(FIELDS) > 50


@PROPERTY
@given(field=st.sampled_from(FIELDS), value=values)
def test_a_field_set_to_anything_validates_or_names_the_field(field, value):
    raw = _copy()
    node = raw
    for part in field[:-1]:
        node = node[part]
    node[field[-1]] = value
    cfg = _check(raw, ".".join(field))
    if cfg is not None and len(field) == 2:  # what validated is what is now in the config
        got = getattr(getattr(cfg, field[0]), field[1])
        assert got is not None or value is None


@PROPERTY
@given(field=st.sampled_from(FIELDS))
def test_a_removed_field_defaults_or_is_named_as_required(field):
    raw = _copy()
    node = raw
    for part in field[:-1]:
        node = node[part]
    del node[field[-1]]
    dotted = ".".join(field)
    cfg = _check(raw, f"`{dotted}` is required")
    if cfg is not None:
        default = RunConfig.model_fields[field[0]] if len(field) == 1 else None
        assert default is None or not default.is_required()


@PROPERTY
@given(
    section=st.sampled_from(SECTIONS + [None]), name=text.filter(str.isidentifier), value=scalars
)
def test_an_unknown_setting_is_named(section, name, value):
    raw = _copy()
    known = set(raw) if section is None else set(raw[section])
    if name in known:
        return
    (raw if section is None else raw[section])[name] = value
    dotted = name if section is None else f"{section}.{name}"
    assert _check(raw, f"`{dotted}` is not a known setting") is None


@PROPERTY
@given(section=st.sampled_from(SECTIONS), value=st.one_of(scalars, st.lists(scalars, max_size=2)))
def test_a_section_that_is_not_a_mapping_is_named(section, value):
    raw = _copy()
    raw[section] = value
    if value is None and section != "data":
        return  # ... None for an optional section is pydantic's business; it must not crash
    assert _check(raw, f"`{section}`") is None


# --------------------------------------------------------------------------- overrides


def _yaml_scalar(value: Any) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10**6)
        .strip()
        .removesuffix("...")
        .strip()
    )


override_values = st.one_of(
    st.integers(-(10**12), 10**12),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.text(st.characters(codec="utf-8", blacklist_categories=("Cs", "Cc")), max_size=12),
    st.lists(st.integers(-100, 100), max_size=3),
)


@PROPERTY
@given(field=st.sampled_from(FIELDS), value=override_values)
def test_an_override_round_trips(field, value):
    """`--set a.b=<yaml of v>` sets exactly `v` at `a.b` and leaves every other field as it was."""
    item = f"{'.'.join(field)}={_yaml_scalar(value)}"
    path, parsed = parse_override(item)
    assert path == list(field)
    assert parsed == value or (isinstance(value, float) and math.isclose(parsed, value))
    out = apply_overrides(VALID, [item])
    node = out
    for part in field[:-1]:
        node = node[part]
    assert node[field[-1]] == parsed
    node[field[-1]] = _get(VALID, field)  # undo it: the rest must be untouched
    assert out == VALID
    _check(apply_overrides(VALID, [item]), ".".join(field))


def _get(raw: dict[str, Any], field: tuple[str, ...]) -> Any:
    for part in field:
        raw = raw[part]
    return raw


@PROPERTY
@given(field=st.sampled_from([f for f in FIELDS if len(f) == 2]))
def test_overriding_a_field_with_its_own_value_changes_nothing(field):
    current = _get(VALID, field)
    item = f"{'.'.join(field)}={json.dumps(current)}"  # JSON is YAML
    cfg = config_from_dict(apply_overrides(VALID, [item]), base_dir=BASE_DIR)
    assert cfg == config_from_dict(_copy(), base_dir=BASE_DIR)


@PROPERTY
@given(item=text)
def test_a_malformed_override_is_a_config_error(item):
    try:
        path, _ = parse_override(item)
    except ConfigError as e:
        assert repr(item) in str(e)
        return
    assert "=" in item and path and all(isinstance(p, str) for p in path)


def test_a_nul_in_a_data_path_is_a_config_error():
    raw = _copy()
    raw["data"]["pool"] = "pool\x00.jsonl"
    with pytest.raises(ConfigError, match="data.pool"):
        config_from_dict(raw, base_dir=BASE_DIR)
