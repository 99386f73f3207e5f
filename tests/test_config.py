"""Config: every shipped preset validates; errors name the field to change."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import CONFIGS, REPO

from mates.config import RunConfig, apply_overrides, config_from_dict, load_config, parse_override
from mates.errors import ConfigError

DATA = {"pool": "pool.jsonl", "reference": "ref.jsonl", "heldout": "heldout.jsonl"}
PRESETS = sorted(CONFIGS.glob("*.yaml"))


def _raw(**sections) -> dict:
    raw = {"data": dict(DATA)}
    for name, value in sections.items():
        raw[name] = value
    return raw


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    return str(exc.value)


# --------------------------------------------------------------------------- shipped presets


def test_presets_are_found():
    names = {p.name for p in PRESETS}
    assert {"tiny.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_shipped_config_loads_and_validates(path: Path):
    cfg = load_config(path, base_dir=REPO)
    assert isinstance(cfg, RunConfig)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for name in ("pool", "reference", "heldout"):
        if name not in raw["data"]:
            continue
        given = Path(raw["data"][name])
        want = given if given.is_absolute() else (REPO / given).resolve()
        assert getattr(cfg.data, name) == want, f"data.{name} did not resolve against base_dir"
    for raw_set, h in zip(raw["data"].get("heldout_sets", []), cfg.data.heldout_sets, strict=True):
        assert h.path == (REPO / raw_set["path"]).resolve() and h.name == raw_set["name"]
    assert cfg.data.primary in {h.name for h in cfg.data.heldout_specs()}
    assert cfg.model.hidden_size % cfg.model.num_heads == 0
    assert 0 < cfg.selection.ratio <= 1
    assert cfg.probing.num_probes >= 4
    # `Run.open` re-validates the dumped config; it must come back identical
    again = config_from_dict(cfg.model_dump(mode="json"))
    assert again.fingerprint() == cfg.fingerprint()
    assert again == cfg


def test_tiny_preset_is_tiny():
    cfg = load_config(CONFIGS / "tiny.yaml", base_dir=REPO)
    assert cfg.device == "cpu"
    assert cfg.influence.encoder == "tiny"
    assert cfg.model.hidden_size <= 64 and cfg.model.num_layers <= 2


# --------------------------------------------------------------------------- field errors


def test_ratio_out_of_range_names_field_and_value():
    msg = _error(_raw(selection={"ratio": 1.5}))
    assert "`selection.ratio`" in msg and "1.5" in msg
    assert "`selection.ratio` must be in (0, 1], got 1.5" in msg


@pytest.mark.parametrize("ratio", [0, -0.2])
def test_ratio_zero_or_negative(ratio):
    msg = _error(_raw(selection={"ratio": ratio}))
    assert "`selection.ratio`" in msg and str(ratio) in msg


def test_unknown_key_is_named():
    msg = _error(_raw(selection={"ratoi": 0.2}))
    assert "`selection.ratoi`" in msg and "not a known setting" in msg
    msg = _error({**_raw(), "learning_rate": 1e-3})
    assert "`learning_rate`" in msg and "not a known setting" in msg


def test_missing_pool_is_named():
    raw = _raw()
    del raw["data"]["pool"]
    msg = _error(raw)
    assert "`data.pool` is required" in msg


def test_missing_data_section_is_named():
    assert "`data` is required" in _error({"seed": 1})


def test_hidden_size_not_divisible_by_heads():
    msg = _error(_raw(model={"hidden_size": 30, "num_heads": 4}))
    assert "model.hidden_size" in msg and "30" in msg
    assert "model.num_heads" in msg and "4" in msg


def test_micro_batch_must_divide_batch():
    msg = _error(_raw(train={"batch_sequences": 6, "micro_batch_sequences": 4}))
    assert "train.micro_batch_sequences" in msg and "train.batch_sequences" in msg


def test_betas_out_of_range():
    msg = _error(_raw(train={"betas": [0.9, 1.5]}))
    assert "`train.betas`" in msg and "1.5" in msg


def test_wrong_type_names_field_and_value():
    msg = _error(_raw(train={"lr": "fast"}))
    assert "`train.lr`" in msg and "'fast'" in msg


def test_bad_choice_names_field():
    msg = _error(_raw(selection={"method": "best"}))
    assert "`selection.method`" in msg and "best" in msg


def test_bad_rows_choice_defaults_to_error_and_names_field():
    assert config_from_dict(_raw()).data.on_bad_row == "error"
    assert config_from_dict(_raw(data={**DATA, "on_bad_row": "skip"})).data.on_bad_row == "skip"
    msg = _error(_raw(data={**DATA, "on_bad_row": "ignore"}))
    assert "`data.on_bad_row`" in msg and "ignore" in msg


def test_several_errors_are_all_reported():
    msg = _error(_raw(selection={"ratio": 2.0}, stages={"num_stages": 0}))
    assert "`selection.ratio`" in msg and "`stages.num_stages`" in msg


# --------------------------------------------------------------------------- overrides


def test_parse_override_parses_yaml_values():
    assert parse_override("selection.ratio=0.3") == (["selection", "ratio"], 0.3)
    assert parse_override("train.betas=[0.9, 0.99]") == (["train", "betas"], [0.9, 0.99])
    assert parse_override("name=abc") == (["name"], "abc")
    assert parse_override("probing.lr=null") == (["probing", "lr"], None)


@pytest.mark.parametrize("bad", ["selection.ratio", "=0.3", " =1"])
def test_override_without_key_or_equals_is_rejected(bad):
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        parse_override(bad)


def test_override_with_invalid_yaml_value():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("train.betas=[0.9,")


def test_override_into_a_scalar_is_rejected():
    with pytest.raises(ConfigError, match="`seed` is not a section"):
        apply_overrides({"seed": 0}, ["seed.value=1"])


def test_overrides_apply_without_touching_the_input():
    raw = _raw(selection={"ratio": 0.2})
    out = apply_overrides(raw, ["selection.ratio=0.5", "model.hidden_size=64"])
    assert raw["selection"]["ratio"] == 0.2 and "model" not in raw
    assert out["selection"]["ratio"] == 0.5 and out["model"]["hidden_size"] == 64


def test_load_config_applies_overrides_and_names_bad_ones(tmp_path):
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        ["selection.method=random", "seed=3", "train.betas=[0.8, 0.9]"],
        base_dir=tmp_path,
    )
    assert cfg.selection.method == "random" and cfg.seed == 3
    assert cfg.train.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="`selection.ratio`.*1.5"):
        load_config(CONFIGS / "tiny.yaml", ["selection.ratio=1.5"], base_dir=tmp_path)
    with pytest.raises(ConfigError, match="`model.hidden_sise`"):
        load_config(CONFIGS / "tiny.yaml", ["model.hidden_sise=8"], base_dir=tmp_path)


# --------------------------------------------------------------------------- files and paths


def test_non_mapping_yaml_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


def test_invalid_yaml_is_rejected(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: {pool: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_base_dir(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "data:\n  pool: d/pool.jsonl\n  reference: /abs/ref.jsonl\n  heldout: h.jsonl\n"
        "  tokenizer: tok\n",
        encoding="utf-8",
    )
    base = tmp_path / "base"
    cfg = load_config(path, base_dir=base)
    assert cfg.data.pool == (base / "d/pool.jsonl").resolve()
    assert cfg.data.reference == Path("/abs/ref.jsonl")
    assert cfg.data.heldout == (base / "h.jsonl").resolve()
    assert cfg.data.tokenizer == str((base / "tok").resolve())
    assert (
        load_config(path, ["data.tokenizer=train-bpe"], base_dir=base).data.tokenizer == "train-bpe"
    )


def test_fingerprint_is_per_section():
    a = config_from_dict(_raw())
    b = config_from_dict(_raw(selection={"method": "random"}))
    assert a.fingerprint() != b.fingerprint()
    stage0 = ("seed", "data", "model", "train", "stages")
    assert a.fingerprint(*stage0) == b.fingerprint(*stage0)
    assert a.fingerprint() == config_from_dict(_raw()).fingerprint()


def test_a_field_added_later_leaves_older_runs_fingerprints_alone():
    """Fields that arrived after runs were made (model.vocab_multiple, the comparison's
    held-out sets, cooldown, samplers, the compare section): at their defaults they are not
    hashed, so a run.json written before they existed still matches its config; set, they count."""
    import hashlib
    import json

    from mates.config import ADDED_FIELDS

    cfg = config_from_dict(_raw())
    before = cfg.model_dump(mode="json")
    del before["tracking"]  # never hashed: where figures are sent is not what a run computes
    for section, name in ADDED_FIELDS:  # what a run made before the fields stored
        if name is None:
            del before[section]
        else:
            del before[section][name]
    old = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.fingerprint() == old
    padded = config_from_dict(_raw(model={"vocab_multiple": 128}))
    assert padded.fingerprint() != cfg.fingerprint()
    assert config_from_dict(padded.model_dump(mode="json")).fingerprint() == padded.fingerprint()
    cooled = config_from_dict(_raw(train={"cooldown_fraction": 0.2}))
    assert cooled.fingerprint() != cfg.fingerprint()
    compared = config_from_dict(_raw(compare={"seeds": 4}))
    assert compared.fingerprint() != cfg.fingerprint()


def test_too_few_probes_for_the_cross_validation_folds_is_named(tiny_config_factory):
    with pytest.raises(
        Exception, match=r"`probing.num_probes` \(8\) must be at least 10.*cv_folds"
    ):
        tiny_config_factory("probing.num_probes=8")
    assert (
        tiny_config_factory("probing.num_probes=8", "influence.cv_folds=4").probing.num_probes == 8
    )


def test_a_chunk_size_above_the_models_context_is_named():
    msg = _error(_raw(data={**DATA, "chunk_tokens": 512}, train={"seq_tokens": 256}))
    assert "`data.chunk_tokens` (512)" in msg and "`train.seq_tokens` = 256" in msg


def test_token_budgets_come_together_and_alone():
    assert "set together" in _error(_raw(stages={"stage_tokens": 1000}))
    msg = _error(_raw(stages={"stage0_tokens": 1000, "stage_tokens": 500, "stage_steps": 7}))
    assert "`stages.stage_steps` cannot be set beside token budgets" in msg
    assert "needs token budgets" in _error(_raw(stages={"pool_multiple": 4}))


def test_token_budgets_become_whole_steps_and_survive_a_saved_config():
    cfg = config_from_dict(
        _raw(
            stages={"stage0_tokens": 5000, "stage_tokens": 4096},
            train={"seq_tokens": 128, "batch_sequences": 16},
        )
    )
    assert [cfg.stage_steps(k) for k in range(3)] == [3, 2, 2]
    assert cfg.pool_multiple == pytest.approx(5.0)  # 1 / selection.ratio by default
    again = config_from_dict(cfg.model_dump(mode="json"))  # how a run dir's manifest reloads
    assert again.fingerprint() == cfg.fingerprint()


def test_a_preset_is_found_by_name_and_a_missing_one_lists_them(tmp_path, monkeypatch):
    """`mates run tiny` works wherever the package is installed: the presets ship with it
    (`configs/` in the repository links to them)."""
    from mates.config import PRESETS

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert (PRESETS / "tiny.yaml").is_file() and (PRESETS / "demo.yaml").is_file()
    assert load_config("tiny").name == load_config(PRESETS / "tiny.yaml").name
    with pytest.raises(
        ConfigError, match=r"config file nope does not exist \(or name a preset: .*tiny"
    ):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file sub/tiny does not exist"):
        load_config("sub/tiny")  # a path is never taken for a preset
