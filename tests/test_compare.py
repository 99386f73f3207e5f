"""`mates compare`: arms over seeds with a shared stage 0, the baselines on a tiny corpus
where the right answer is known, the summary's statistics and the bad-input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import TINY_CONFIG, read_jsonl
from safetensors.torch import load_file

from mates.artifacts import RunPaths, read_json
from mates.cli import main
from mates.compare import (
    _compute_at,
    _to_match,
    arm_config,
    arm_dir,
    check_arms,
    compare,
    format_table,
)
from mates.data.corpus import iter_corpus
from mates.data.reference import pack_rows
from mates.errors import ConfigError
from mates.lm import build_lm, row_losses
from mates.run import Run
from mates.selection import label_matches

ARMS = ["random", "mates", "static", "dsir", "perplexity", "label", "random-aa"]


@pytest.fixture(scope="module")
def comparison(tiny_config_factory, demo_base):
    cfg = tiny_config_factory(
        f"compare.arms=[{','.join(ARMS)}]",
        "compare.seeds=2",
        "compare.target_labels=[news]",
        "compare.bootstrap=200",
    )
    out = demo_base / "comparison"
    summary = compare(cfg, out, progress=False)
    return {"cfg": cfg, "out": out, "summary": summary}


def _paths(c, seed, arm) -> RunPaths:
    return RunPaths(arm_dir(c["out"], seed, arm))


@pytest.mark.slow
def test_every_arm_shares_stage_0_pools_and_budget(comparison):
    for seed in (0, 1):
        base = _paths(comparison, seed, "random")
        weights = (base.checkpoint(0) / "model.safetensors").read_bytes()
        for arm in ARMS:
            p = _paths(comparison, seed, arm)
            m = read_json(p.manifest)
            assert m["status"] == "done" and m["config"]["seed"] == seed
            assert (p.checkpoint(0) / "model.safetensors").read_bytes() == weights
            assert read_json(p.selection(0)) == read_json(base.selection(0))
            assert read_json(p.pool(1)) == read_json(base.pool(1))  # stage 1's pool is common
            assert (
                m["stages"][-1]["metrics"]["tokens"]
                == read_json(base.manifest)["stages"][-1]["metrics"]["tokens"]
            )
            assert all(p.cooldown(k).is_file() for k in range(3))
    # another seed is another stage 0
    assert (_paths(comparison, 0, "random").checkpoint(0) / "model.safetensors").read_bytes() != (
        _paths(comparison, 1, "random").checkpoint(0) / "model.safetensors"
    ).read_bytes()


@pytest.mark.slow
def test_static_reuses_stage_0_model_and_mates_refits(comparison):
    for seed in (0, 1):
        static, mates = _paths(comparison, seed, "static"), _paths(comparison, seed, "mates")
        sid, mid = read_json(static.manifest)["run_id"], read_json(mates.manifest)["run_id"]
        for k in (1, 2):
            assert read_json(static.selection(k))["model_version"] == f"{sid}/0"
            assert read_json(mates.selection(k))["model_version"] == f"{mid}/{k - 1}"
        assert not static.probes(1).exists() and mates.probes(1).is_file()
        # stage 0 is the same checkpoint, so stage 0's model chose the same stage-1 data
        assert read_json(static.selection(1))["ids"] == read_json(mates.selection(1))["ids"]
        # ... from the same probes, measured once (mates) and lent to static with their cost
        assert static.probes(0).read_bytes() == mates.probes(0).read_bytes()
        s0, m0 = (read_json(p.manifest)["stages"][0] for p in (static, mates))
        assert s0["metrics"]["probes_shared_from"] == str(_paths(comparison, seed, "mates").root)
        assert s0["metrics"]["probes"] == m0["metrics"]["probes"]
        assert s0["metrics"]["influence_model"] == m0["metrics"]["influence_model"]
        assert s0["metrics"]["flops"]["probe"] == m0["metrics"]["flops"]["probe"] > 0
        assert s0["timings"]["probing"] >= m0["timings"]["probing"]
        assert read_json(static.influence_model(0) / "meta.json")["copied_from"] == f"{mid}/0"


@pytest.mark.slow
def test_label_keeps_exactly_the_labelled_rows(comparison, demo_base):
    cfg = comparison["cfg"]
    labels = {r.id: r.domain for r in iter_corpus(cfg.data.pool)}
    for seed in (0, 1):
        p = _paths(comparison, seed, "label")
        for k in (1, 2):
            sel = read_json(p.selection(k))
            pool = read_json(p.pool(k))["ids"]
            matching = [d for d in pool if label_matches([labels[d]], ["news"])[0]]
            chosen = set(sel["ids"])
            assert sel["pool_matching"] == len(matching)
            if len(matching) >= sel["selected"]:
                assert chosen <= set(matching) and sel["filled_at_random"] == 0
            else:  # all of them, the rest of the budget at random
                assert set(matching) <= chosen and sel["filled_at_random"] == sel["selected"] - len(
                    matching
                )


@pytest.mark.slow
def test_perplexity_keeps_the_lowest_stage0_loss_documents(comparison):
    run = Run.open(arm_dir(comparison["out"], 0, "perplexity"), progress=False)
    run.prepare()
    for k in (1, 2):
        sel = read_json(run.paths.selection(k))
        rows = read_jsonl(run.paths.stage(k - 1) / "perplexity-scores.jsonl")
        ranked = [r["id"] for r in sorted(rows, key=lambda r: r["score"])]
        assert sorted(sel["ids"]) == sorted(ranked[: sel["selected"]])
        assert sel["sampler"] == "topk"
    # the scores are the stage-0 checkpoint's per-token losses, recomputed here by hand
    rows = read_jsonl(run.paths.stage(0) / "perplexity-scores.jsonl")[:5]
    T = run.cfg.train.seq_tokens
    model = build_lm(run.cfg.model, len(run.tokenizer), T, run.eos)
    model.load_state_dict(load_file(run.paths.checkpoint(0) / "model.safetensors"))
    toks = [
        [run.eos] + run.corpus.token_ids(run.corpus.index_of(r["id"]))[: T - 1].tolist()
        for r in rows
    ]
    ref = pack_rows([(t, len(t) - 1) for t in toks], "x", list(range(len(toks))))
    sums, counts, _ = row_losses(model, ref, 8, run.cfg.train.precision)
    mine = np.zeros(len(toks))
    mine[ref.docs.numpy()] = (sums / counts).numpy()
    assert mine == pytest.approx([r["score"] for r in rows], abs=1e-4)


@pytest.mark.slow
def test_dsir_and_aa_arms(comparison):
    for seed in (0, 1):
        dsir = _paths(comparison, seed, "dsir")
        rows = read_jsonl(dsir.stage(0) / "dsir-scores.jsonl")
        sel = read_json(dsir.selection(1))
        assert (
            sel["method"] == "dsir" and sel["temperature"] == 1.0 and sel["model_version"] is None
        )
        scores = {r["id"]: r["score"] for r in rows}
        assert np.mean([scores[d] for d in sel["ids"]]) < np.mean(list(scores.values()))
        aa, rnd = _paths(comparison, seed, "random-aa"), _paths(comparison, seed, "random")
        assert read_json(aa.selection(1))["seed"] == [seed + 1000, 1, 11]
        assert read_json(aa.selection(1))["ids"] != read_json(rnd.selection(1))["ids"]


@pytest.mark.slow
def test_summary_json_table_and_report(comparison):
    out, s = comparison["out"], comparison["summary"]
    on_disk = read_json(out / "comparison.json")
    assert on_disk == json.loads(json.dumps(s))
    assert on_disk["schema"] == "mates.comparison/1" and on_disk["arms"][0] == "random"
    assert on_disk["seeds"] == [0, 1] and on_disk["primary_heldout"] == "heldout"
    for arm in ARMS:
        a = on_disk["summary"][arm]
        final = a["final"]["heldout"]
        per_seed = [
            on_disk["runs"][arm][str(sd)]["cooldown"][-1]["heldout"]["loss"] for sd in (0, 1)
        ]
        assert final["estimate"] == pytest.approx(np.mean(per_seed), abs=1e-5)
        assert final["low"] < final["estimate"] < final["high"] and final["n"] == 2
        d = a["difference_to_random"]
        assert len(d["by_stage"]) == 3 and d["by_stage"][0]["per_seed"] == [
            0.0,
            0.0,
        ]  # stage 0 shared
        if arm == "random":
            assert d["final"]["estimate"] == 0.0
        assert {"tokens_to_match", "compute_to_match", "to_match_per_seed"} <= set(a)
    assert (
        on_disk["aa_spread"]["final"]
        == on_disk["summary"]["random-aa"]["difference_to_random"]["final"]
    )
    # MATES pays for its selection; random and label do not
    assert on_disk["summary"]["mates"]["selection_over_training"]["estimate"] > 0
    assert on_disk["summary"]["random"]["selection_over_training"]["estimate"] == 0
    table = format_table(s)
    assert all(arm in table for arm in ARMS) and "A/A spread" in table
    assert (out / "comparison.png").read_bytes().startswith(b"\x89PNG")
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and "random-aa" in html


@pytest.mark.slow
def test_compare_again_reuses_every_arm(comparison, monkeypatch):
    def must_not_run(self, *a, **kw):
        raise AssertionError("a finished arm was executed again")

    monkeypatch.setattr(Run, "execute", must_not_run)
    assert compare(comparison["cfg"], comparison["out"], progress=False) == comparison["summary"]


@pytest.mark.slow
def test_cli_compare_prints_the_table(comparison, capsys, monkeypatch, demo_base):
    monkeypatch.chdir(demo_base)  # tiny.yaml's data paths are relative
    code = main(
        [
            "compare",
            str(TINY_CONFIG),
            "--out",
            str(comparison["out"]),
            "--no-progress",
            "--arms",
            ",".join(ARMS),
            "--seeds",
            "2",
            "--set",
            "compare.target_labels=[news]",
            "--set",
            "compare.bootstrap=200",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and format_table(comparison["summary"]) in out and "comparison.json" in out


# --------------------------------------------------------------------------- to match, from ledgers


def _ledger(train_per_stage, select_per_stage, tokens_per_stage):
    stages, end = [], 0
    for tr, sel, tok in zip(train_per_stage, select_per_stage, tokens_per_stage, strict=True):
        end += tok
        stages.append({"tokens": end, "flops": {"train": tr, "probe": sel}})
    return {"stages": stages, "training_flops": sum(train_per_stage)}


def test_compute_at_counts_the_selections_used_so_far():
    led = _ledger([100.0, 50.0, 50.0], [10.0, 20.0, 0.0], [200, 100, 100])
    assert _compute_at(led, 200) == 100.0  # stage 0 only: its selection is not used yet
    assert _compute_at(led, 250) == pytest.approx(100 + 10 + 25)
    assert _compute_at(led, 400) == pytest.approx(200 + 10 + 20)


def _arm(points, led):
    return {
        "points": [
            {"stage": i, "tokens": t, "sets": {"h": {"loss": v}}} for i, (t, v) in enumerate(points)
        ],
        "ledger": led,
    }


def test_to_match_is_censored_and_never_inside_stage_0():
    led = _ledger([100.0, 50.0, 50.0], [10.0, 20.0, 0.0], [200, 100, 100])
    base = {0: _arm([(200, 5.0), (300, 4.5), (400, 4.0)], led)}
    # reaches random's final 4.0 halfway through stage 1 → 250 of 400 tokens
    fast = {0: _arm([(200, 5.0), (300, 3.0), (400, 2.5)], led)}
    out = _to_match(fast, base, [0], "h")
    assert out["to_match_per_seed"][0]["tokens"] == pytest.approx(250.0)
    assert out["tokens_to_match"]["median"] == pytest.approx(0.625)
    assert out["compute_to_match"]["median"] == pytest.approx((100 + 25 + 10) / 200)
    slow = {0: _arm([(200, 5.0), (300, 4.8), (400, 4.1)], led)}
    out = _to_match(slow, base, [0], "h")
    assert out["tokens_to_match"] == {
        "median": None,
        "min": None,
        "max": None,
        "censored": 1,
        "n": 1,
    }
    # a curve whose constant-lr stage 0 dipped below the target is still searched from stage 0's end
    odd = {0: _arm([(200, 3.9), (300, 4.5), (400, 4.5)], led)}
    assert _to_match(odd, base, [0], "h")["to_match_per_seed"][0]["tokens"] == 200


# --------------------------------------------------------------------------- bad input, before training


def _no_runs(tmp_path):
    return not any(tmp_path.rglob("run.json"))


def test_unknown_arm_is_refused(tiny_config_factory):
    with pytest.raises(ConfigError, match=r"`compare.arms` unknown arm\(s\) \['bogus'\]"):
        tiny_config_factory("compare.arms=[random,bogus]")


def test_one_seed_with_intervals_is_refused(tiny_config_factory):
    with pytest.raises(ConfigError, match="`compare.seeds` must be at least 2"):
        tiny_config_factory("compare.seeds=1")
    assert tiny_config_factory("compare.seeds=1", "compare.intervals=false").compare.seeds == 1


def test_label_arm_errors_name_the_setting(tiny_config_factory, tmp_path):
    cfg = tiny_config_factory("compare.arms=[random,label]")
    with pytest.raises(ConfigError, match="`compare.target_labels`"):
        compare(cfg, tmp_path)
    cfg = tiny_config_factory(
        "compare.arms=[random,label]", "compare.target_labels=[nothing-like-this]"
    )
    with pytest.raises(
        ConfigError, match=r"`compare.target_labels` \['nothing-like-this'\] match no"
    ):
        compare(cfg, tmp_path)
    cfg = tiny_config_factory(
        "compare.arms=[random,label]", "compare.target_labels=[news]", "data.domain_field=null"
    )
    with pytest.raises(ConfigError, match="label column"):
        compare(cfg, tmp_path)
    assert _no_runs(tmp_path)


def test_label_method_in_a_plain_run_fails_before_training(tiny_config_factory, tmp_path):
    cfg = tiny_config_factory("selection.method=label", "selection.target_labels=[nope]")
    with pytest.raises(Exception, match="match no document"):
        Run(cfg, tmp_path / "r", progress=False).execute()
    assert not RunPaths(tmp_path / "r").checkpoint(0).exists()


def test_arms_without_random_are_refused(tiny_config_factory, tmp_path):
    with pytest.raises(ConfigError, match="must include 'random'"):
        check_arms(tiny_config_factory("compare.arms=[mates,dsir]"))


def test_cli_compare_errors_name_the_setting(demo_base, capsys, monkeypatch):
    monkeypatch.chdir(demo_base)
    cfg = str(TINY_CONFIG)
    assert main(["compare", cfg, "--arms", "random,bogus", "--out", "x"]) == 2
    assert "`compare.arms` unknown arm(s) ['bogus']" in capsys.readouterr().err
    assert main(["compare", cfg, "--seeds", "1", "--out", "x"]) == 2
    assert "`compare.seeds` must be at least 2" in capsys.readouterr().err


def test_arm_config_changes_only_the_selection(tiny_config_factory):
    cfg = tiny_config_factory("compare.target_labels=[news]")
    for arm in ARMS:
        c = arm_config(cfg, arm, 5)
        assert c.seed == 5 and c.fingerprint("data", "model", "train", "stages") == cfg.fingerprint(
            "data", "model", "train", "stages"
        )
    assert arm_config(cfg, "mates", 0).selection.method == "gumbel"  # tiny.yaml's sampler kept
    assert arm_config(cfg, "random-aa", 5).selection.seed == 1005
    assert arm_config(cfg, "label", 0).selection.target_labels == ["news"]
