"""End-to-end runs of `configs/tiny.yaml` on the demo data: layout, records, resume, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_CONFIG, read_jsonl
from safetensors.torch import load_file

from mates.artifacts import RunPaths, read_json
from mates.config import apply_overrides, config_from_dict
from mates.errors import ConfigError, RunStateError, StageFailed
from mates.manifest import STAGE_STATES
from mates.run import Cancelled, Run
from mates.train import Trainer

pytestmark = pytest.mark.slow


def _selection_ids(run_dir) -> list[list[str]]:
    paths = RunPaths(run_dir)
    n = len(read_json(paths.manifest)["stages"])
    return [read_json(paths.selection(k))["ids"] for k in range(n)]


def _states(stage: dict) -> list[str]:
    return [t["state"] for t in stage["transitions"]]


# --------------------------------------------------------------------------- the uninterrupted run


def test_every_stage_is_done(tiny_run):
    m = read_json(RunPaths(tiny_run["dir"]).manifest)
    assert m == tiny_run["manifest"]
    assert m["status"] == "done" and m["error"] is None
    assert len(m["stages"]) == tiny_run["cfg"].stages.num_stages == 3
    assert [s["state"] for s in m["stages"]] == ["done"] * 3
    assert all(s["error"] is None for s in m["stages"])
    assert m["config"] == tiny_run["cfg"].model_dump(mode="json")
    assert m["config_fingerprint"] == tiny_run["cfg"].fingerprint()


def test_transitions_follow_the_design_order_with_timestamps(tiny_run):
    stages = tiny_run["manifest"]["stages"]
    last = len(stages) - 1
    previous_end = 0.0
    for k, st in enumerate(stages):
        states = _states(st)
        if k < last:
            assert states == list(STAGE_STATES)  # pending → training → … → selecting → done
        else:
            assert states == ["pending", "training", "done"]  # nothing to prepare after the last
        times = [t["at"] for t in st["transitions"]]
        assert times == sorted(times)
        assert times[1] >= previous_end  # stage k+1 starts training after stage k is done
        previous_end = times[-1]


def test_timings_and_metrics_are_recorded_per_stage(tiny_run):
    cfg = tiny_run["cfg"]
    stages = tiny_run["manifest"]["stages"]
    steps = 0
    for k, st in enumerate(stages):
        expected = {"training"} if k == len(stages) - 1 else set(STAGE_STATES[1:-1])
        expected.add("cooldown_eval")
        assert set(st["timings"]) == expected
        assert all(v >= 0 for v in st["timings"].values())
        m = st["metrics"]
        steps += cfg.stages.stage0_steps if k == 0 else cfg.stages.stage_steps
        assert m["steps"] == steps
        assert m["tokens"] == steps * cfg.train.batch_sequences * cfg.train.seq_tokens
        for key in ("heldout_loss", "reference_loss", "train_loss"):
            assert math.isfinite(m[key]) and m[key] > 0
        assert m["selection"]["selected"] == 40
        if k < len(stages) - 1:
            assert m["probes"]["count"] == cfg.probing.num_probes
            assert -1 <= m["influence_model"]["val_spearman"] <= 1
            assert m["scores"]["count"] == cfg.stages.pool_docs


def test_metrics_log_has_losses_by_step_and_tokens(tiny_run):
    cfg = tiny_run["cfg"]
    rows = read_jsonl(RunPaths(tiny_run["dir"]).metrics)
    per_step = cfg.train.batch_sequences * cfg.train.seq_tokens
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps))  # strictly increasing, nothing logged twice
    assert steps[0] == 0 and steps[-1] == 40
    assert {10, 20, 30, 40} <= set(steps)
    for r in rows:
        assert r["tokens"] == r["step"] * per_step
        assert math.isfinite(r["reference_loss"]) and math.isfinite(r["heldout_loss"])
        if r["step"] > 0:
            assert math.isfinite(r["train_loss"]) and r["lr"] > 0
    assert rows[-1]["heldout_loss"] < rows[0]["heldout_loss"]  # it learned something
    by_step = {r["step"]: r for r in rows}
    for st in tiny_run["manifest"]["stages"]:
        m = st["metrics"]
        assert by_step[m["steps"]]["heldout_loss"] == m["heldout_loss"]
        assert by_step[m["steps"]]["reference_loss"] == m["reference_loss"]


def test_every_stage_artifact_exists(tiny_run):
    paths = RunPaths(tiny_run["dir"])
    last = tiny_run["cfg"].stages.num_stages - 1
    for k in range(last + 1):
        assert paths.selection(k).is_file() and paths.pool(k).is_file()
        ck = paths.checkpoint(k)
        assert {"model.safetensors", "optimizer.pt", "rng.pt", "trainer.json"} <= {
            p.name for p in ck.iterdir()
        }
        assert read_json(ck / "trainer.json")["complete"] is True
        has_next = k < last
        assert paths.probes(k).is_file() == has_next
        assert (paths.influence_model(k) / "meta.json").is_file() == has_next
        assert paths.scores(k).is_file() == has_next
    assert (paths.tokenizer / "tokenizer.json").is_file()
    assert (paths.tokenized / "meta.json").is_file()
    leftovers = [p for p in tiny_run["dir"].rglob(".*")]
    assert leftovers == []  # no temporaries from atomic writes


def test_final_model_loads_with_transformers(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = RunPaths(tiny_run["dir"])
    model = AutoModelForCausalLM.from_pretrained(str(paths.export()), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(paths.export()), local_files_only=True)
    last = load_file(paths.checkpoint(tiny_run["cfg"].stages.num_stages - 1) / "model.safetensors")
    state = model.state_dict()
    for name, tensor in last.items():
        assert torch.equal(state[name], tensor), name
    ids = tok("the market rose", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_selection_manifests(tiny_run):
    paths = RunPaths(tiny_run["dir"])
    cfg, run_id = tiny_run["cfg"], tiny_run["manifest"]["run_id"]
    corpus_ids = {r["id"] for r in read_jsonl(cfg.data.pool)}
    seen: set[str] = set()
    for k in range(cfg.stages.num_stages):
        sel, pool = read_json(paths.selection(k)), read_json(paths.pool(k))["ids"]
        assert len(pool) == len(set(pool)) == cfg.stages.pool_docs
        assert set(pool) <= corpus_ids
        assert not set(pool) & seen  # resample mode: never re-offers trained documents
        ids = sel["ids"]
        assert len(ids) == len(set(ids)) == round(cfg.selection.ratio * len(pool))
        assert set(ids) <= set(pool)
        assert sel["ratio"] == cfg.selection.ratio
        assert sel["seed"] == [cfg.seed, k, 11]
        assert sel["pool_size"] == len(pool) and sel["selected"] == len(ids)
        assert sum(sel["domains"].values()) == len(ids)
        if k == 0:
            assert sel["method"] == "random" and sel["model_version"] is None
        else:
            assert sel["method"] == "gumbel"
            assert sel["temperature"] == cfg.selection.temperature
            assert sel["model_version"] == f"{run_id}/{k - 1}"
            im = read_json(paths.influence_model(k - 1) / "meta.json")
            assert im["version"] == sel["model_version"]
        seen |= set(ids)


def test_probes_and_scores_refer_to_the_next_pool_by_id(tiny_run):
    paths = RunPaths(tiny_run["dir"])
    cfg = tiny_run["cfg"]
    for k in range(cfg.stages.num_stages - 1):
        pool = read_json(paths.pool(k + 1))["ids"]
        probes = read_jsonl(paths.probes(k))
        assert len(probes) == cfg.probing.num_probes
        assert {p["id"] for p in probes} <= set(pool)
        assert all(math.isfinite(p["influence"]) for p in probes)
        assert len({p["influence"] for p in probes}) > 1
        scores = read_jsonl(paths.scores(k))
        assert sorted(s["id"] for s in scores) == sorted(pool)
        assert all(math.isfinite(s["score"]) for s in scores)


def test_a_done_run_cannot_be_executed_again(tiny_run):
    run = Run.open(tiny_run["dir"], progress=False)
    assert run.cfg.fingerprint() == tiny_run["cfg"].fingerprint()
    with pytest.raises(RunStateError, match="already done"):
        run.execute()


def test_a_different_config_into_the_same_dir_is_refused(tiny_run, tiny_config_factory):
    before = RunPaths(tiny_run["dir"]).manifest.read_bytes()
    with pytest.raises(ConfigError, match="different config"):
        Run(tiny_config_factory("seed=1"), tiny_run["dir"], progress=False)
    with pytest.raises(ConfigError, match="different config"):
        Run(tiny_config_factory("selection.temperature=1.0"), tiny_run["dir"], progress=False)
    assert RunPaths(tiny_run["dir"]).manifest.read_bytes() == before


# --------------------------------------------------------------------------- determinism + resume


def test_same_config_and_seed_give_identical_selections(tiny_run, tiny_config_factory, tmp_path):
    Run(tiny_config_factory(), tmp_path / "again", progress=False).execute()
    assert _selection_ids(tmp_path / "again") == _selection_ids(tiny_run["dir"])
    a = read_jsonl(RunPaths(tmp_path / "again").probes(0))
    b = read_jsonl(RunPaths(tiny_run["dir"]).probes(0))
    assert [(r["id"], r["influence"]) for r in a] == [(r["id"], r["influence"]) for r in b]


def test_another_seed_selects_differently(tiny_run, tiny_config_factory, tmp_path):
    cfg = tiny_config_factory("seed=1", "stages.num_stages=1")
    Run(cfg, tmp_path / "seed1", progress=False).execute()
    assert _selection_ids(tmp_path / "seed1")[0] != _selection_ids(tiny_run["dir"])[0]


def test_failed_run_is_recorded_and_resumes_to_the_same_selections(
    tiny_run, tiny_config_factory, tmp_path, monkeypatch
):
    cfg = tiny_config_factory()
    out = tmp_path / "resumed"
    real_step = Trainer.train_step

    def nan_in_stage_1(self, stream):
        if self.step >= cfg.stages.stage0_steps:
            return float("nan")
        return real_step(self, stream)

    monkeypatch.setattr(Trainer, "train_step", nan_in_stage_1)
    with pytest.raises(StageFailed, match="stage 1 failed.*non-finite"):
        Run(cfg, out, progress=False).execute()

    m = read_json(RunPaths(out).manifest)
    assert m["status"] == "failed"
    assert "stage 1" in m["error"] and "non-finite" in m["error"]
    assert [s["state"] for s in m["stages"]] == ["done", "failed", "pending"]
    assert "non-finite" in m["stages"][1]["error"]
    assert _states(m["stages"][1])[-2:] == ["training", "failed"]
    events = read_jsonl(RunPaths(out).events)
    assert events[-1]["event"] == "failed" and events[-1]["stage"] == 1

    monkeypatch.undo()  # the fault is fixed
    done = Run.open(out, progress=False).execute()
    assert done.data["status"] == "done" and done.data["error"] is None
    assert [s["state"] for s in done.data["stages"]] == ["done"] * 3
    assert _states(done.data["stages"][1])[:4] == ["pending", "training", "failed", "training"]
    assert _selection_ids(out) == _selection_ids(tiny_run["dir"])
    steps = [r["step"] for r in read_jsonl(RunPaths(out).metrics)]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_cancelled_mid_stage_resumes_from_the_mid_stage_checkpoint(
    tiny_run, tiny_config_factory, tmp_path, monkeypatch
):
    cfg = tiny_config_factory("train.checkpoint_every_steps=5")
    out = tmp_path / "cancelled"
    real_step = Trainer.train_step

    def cancel_after_step_12(self, stream):
        loss = real_step(self, stream)
        if self.step == 12:
            (out / "cancel").touch()
        return loss

    monkeypatch.setattr(Trainer, "train_step", cancel_after_step_12)
    with pytest.raises(Cancelled):
        Run(cfg, out, progress=False).execute()
    m = read_json(RunPaths(out).manifest)
    assert m["status"] == "cancelled" and m["stages"][0]["state"] == "cancelled"
    ck = read_json(RunPaths(out).checkpoint(0) / "trainer.json")
    assert (ck["stage_step"], ck["complete"]) == (10, False)

    monkeypatch.undo()
    seen_starts = []
    real_train = Trainer.train

    def record_start(self, stream, steps, callbacks, stage_step=0):
        seen_starts.append((self.step, stage_step))
        return real_train(self, stream, steps, callbacks, stage_step)

    monkeypatch.setattr(Trainer, "train", record_start)
    Run.open(out, progress=False).execute()
    assert seen_starts[0] == (10, 10)  # continued from the checkpoint, not from scratch
    assert not (out / "cancel").exists()
    assert _selection_ids(out) == _selection_ids(tiny_run["dir"])
    rows = read_jsonl(RunPaths(out).metrics)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps))
    ref = {r["step"]: r["heldout_loss"] for r in read_jsonl(RunPaths(tiny_run["dir"]).metrics)}
    assert all(np.isclose(r["heldout_loss"], ref[r["step"]], atol=1e-5) for r in rows)


def test_disjoint_pools_are_disjoint_slices(tiny_config_factory, tmp_path):
    cfg = tiny_config_factory(
        "stages.num_stages=2",
        "stages.pool_mode=disjoint",
        "stages.pool_docs=100",
        "stages.stage0_steps=2",
        "stages.stage_steps=2",
        "probing.num_probes=10",
        "influence.epochs=1",
    )
    Run(cfg, tmp_path / "disjoint", progress=False).execute()
    paths = RunPaths(tmp_path / "disjoint")
    p0, p1 = (read_json(paths.pool(k))["ids"] for k in range(2))
    assert len(p0) == len(p1) == 100 and not set(p0) & set(p1)


def test_impossible_disjoint_pools_fail_before_training(tiny_config_factory, tmp_path):
    cfg = tiny_config_factory("stages.pool_mode=disjoint", "stages.pool_docs=100000")
    out = tmp_path / "too-big"
    with pytest.raises((ConfigError, StageFailed), match="`stages.pool_docs`"):
        Run(cfg, out, progress=False).execute()
    assert not RunPaths(out).checkpoint(0).exists()


def _token_budget_config(demo_base, *extra: str):
    """configs/tiny.yaml with token budgets in place of its steps and pool size; seq 64 x
    batch 8 = 512 tokens a step: stage 0 four steps, the later stages two each."""
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    for name in ("stage0_steps", "stage_steps", "pool_docs"):
        del raw["stages"][name]
    raw = apply_overrides(
        raw,
        [
            "stages.num_stages=3",
            "stages.pool_mode=disjoint",
            "stages.stage0_tokens=2000",
            "stages.stage_tokens=1024",
            "stages.pool_multiple=3",
            "data.chunk_tokens=64",
            "probing.num_probes=10",
            "influence.epochs=1",
            *extra,
        ],
    )
    return config_from_dict(raw, demo_base)


def test_token_budgets_give_disjoint_pools_and_one_epoch_per_stage(demo_base, tmp_path):
    cfg = _token_budget_config(demo_base)
    assert [cfg.stage_steps(k) for k in range(3)] == [4, 2, 2]
    run = Run(cfg, tmp_path / "tokens", progress=False)
    manifest = run.execute().data
    paths = RunPaths(tmp_path / "tokens")
    corpus = run.corpus
    assert corpus.meta["chunk_tokens"] == 64 and corpus.meta["chunked_documents"] > 0
    assert int(corpus.num_tokens().max()) <= 64
    pools = [read_json(paths.pool(k))["ids"] for k in range(3)]
    assert not set(pools[0]) & set(pools[1]) and not set(pools[1]) & set(pools[2])
    assert not set(pools[0]) & set(pools[2])

    def tokens(ids):  # each unit followed by its EOS, as the stream reads it
        return int((corpus.num_tokens(corpus.indices_of(ids)) + 1).sum())

    for k in range(3):
        need = cfg.stage_steps(k) * 8 * 64 + 1
        pool_need = need if k == 0 else math.ceil(3 * need)
        assert tokens(pools[k]) >= pool_need  # filled, and by the shortest prefix that fills
        assert tokens(pools[k][:-1]) < pool_need
        sel = read_json(paths.selection(k))
        assert sel["budget_tokens"] == need and sel["filled"] and sel["ratio"] is None
        assert tokens(sel["ids"]) >= need
        # a selection stops at the document that fills its budget: one epoch, nothing repeated
        assert manifest["stages"][k]["metrics"]["selection_epochs"] == 1
    # stage 0's pool is its budget: the random selection that fills it takes (nearly) all
    sel0 = read_json(paths.selection(0))["ids"]
    assert set(sel0) <= set(pools[0]) and len(sel0) >= len(pools[0]) - 3


def test_token_budgets_the_corpus_cannot_fill_fail_before_training(demo_base, tmp_path):
    cfg = _token_budget_config(demo_base, "stages.stage_tokens=10000000")
    out = tmp_path / "too-big-tokens"
    with pytest.raises(
        (ConfigError, StageFailed), match="`stages.stage_tokens`.*lower the budgets"
    ):
        Run(cfg, out, progress=False).execute()
    assert not RunPaths(out).checkpoint(0).exists()


def test_the_label_arm_fills_a_token_budget_with_matching_units_first(demo_base, tmp_path):
    cfg = _token_budget_config(
        demo_base, "selection.method=label", "selection.target_labels=[news]"
    )
    run = Run(cfg, tmp_path / "label-tokens", progress=False)
    run.execute()
    sel = read_json(RunPaths(tmp_path / "label-tokens").selection(1))
    matching = [
        d
        for d in sel["ids"]
        if (run.corpus.domain(run.corpus.index_of(d)) or "").startswith("news")
    ]
    assert len(sel["ids"]) - len(matching) == sel["filled_at_random"]
    if sel["filled_at_random"]:  # too few news units: every one of them kept, then others
        assert len(matching) == sel["pool_matching"]


def test_failure_after_the_last_stage_is_recorded(tiny_config_factory, tmp_path, monkeypatch):
    from mates.errors import ArtifactError

    def disk_full(self):
        raise ArtifactError("disk full")

    monkeypatch.setattr(Run, "_export", disk_full)
    out = tmp_path / "export-fails"
    with pytest.raises(StageFailed, match="disk full"):
        Run(tiny_config_factory("stages.num_stages=1"), out, progress=False).execute()
    m = read_json(RunPaths(out).manifest)
    assert m["status"] == "failed" and "disk full" in m["error"]


def test_re_executing_the_same_run_object_after_a_failure(
    tiny_run, tiny_config_factory, tmp_path, monkeypatch
):
    cfg = tiny_config_factory()
    real_step = Trainer.train_step

    def nan_mid_stage_1(self, stream):
        if self.step >= cfg.stages.stage0_steps + 5:
            return float("nan")
        return real_step(self, stream)

    monkeypatch.setattr(Trainer, "train_step", nan_mid_stage_1)
    run = Run(cfg, tmp_path / "same-object", progress=False)
    with pytest.raises(StageFailed):
        run.execute()
    monkeypatch.undo()
    run.execute()
    stages = read_json(RunPaths(tmp_path / "same-object").manifest)["stages"]
    assert [s["metrics"]["steps"] for s in stages] == [20, 30, 40]
    assert _selection_ids(tmp_path / "same-object") == _selection_ids(tiny_run["dir"])


def _texts_by_id(cfg) -> dict[str, str]:
    return {r["id"]: r["text"] for r in read_jsonl(cfg.data.pool)}


def _assert_scores_match_saved_model(run_dir, cfg, k: int) -> None:
    from mates.influence import InfluenceScorer

    paths = RunPaths(run_dir)
    scores = read_jsonl(paths.scores(k))
    texts = _texts_by_id(cfg)
    scorer = InfluenceScorer.load(paths.influence_model(k), torch.device("cpu"))
    expected = scorer.score_texts([texts[s["id"]] for s in scores])
    assert np.allclose([s["score"] for s in scores], expected, atol=1e-5)


def test_pool_scores_are_the_saved_models_predictions(tiny_run):
    for k in range(tiny_run["cfg"].stages.num_stages - 1):
        _assert_scores_match_saved_model(tiny_run["dir"], tiny_run["cfg"], k)


def test_frozen_encoder_run_scores_with_cached_features(tiny_config_factory, tmp_path):
    cfg = tiny_config_factory(
        "influence.train_encoder=false",
        "influence.epochs=20",
        "stages.num_stages=3",
        "stages.stage0_steps=4",
        "stages.stage_steps=2",
    )
    out = tmp_path / "frozen"
    Run(cfg, out, progress=False).execute()
    for k in range(2):
        _assert_scores_match_saved_model(out, cfg, k)
    assert (RunPaths(out).influence_model(0) / "encoder" / "config.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_rejected_device_does_not_poison_the_out_dir(tiny_config_factory, tmp_path):
    out = tmp_path / "cuda-less"
    with pytest.raises(ConfigError, match="no CUDA device"):
        Run(tiny_config_factory("device=cuda"), out, progress=False)
    run = Run(tiny_config_factory("device=cpu"), out, progress=False)  # raises with the bug
    assert run.manifest.data["config"]["device"] == "cpu"


# --------------------------------------------------------------------------- stage functions


@pytest.mark.slow
def test_sharded_scoring_selects_the_same_documents(tiny_config_factory, tiny_run, tmp_path):
    """Scoring in shards of 64 (the workers' unit) changes nothing the run selects."""
    cfg = tiny_config_factory("influence.score_shard_docs=64")
    Run(cfg, tmp_path / "sharded", progress=False).execute()
    ours, theirs = RunPaths(tmp_path / "sharded"), RunPaths(tiny_run["dir"])
    assert sorted(p.name for p in ours.score_shard(0, 0).parent.iterdir()) == [
        f"shard-{i:05d}.jsonl" for i in range(math.ceil(cfg.stages.pool_docs / 64))
    ]
    for k in range(cfg.stages.num_stages):
        assert read_json(ours.selection(k))["ids"] == read_json(theirs.selection(k))["ids"], k
    merged = [r["id"] for r in read_jsonl(ours.scores(0))]
    assert merged == read_json(ours.pool(1))["ids"]


def _snapshot(paths: RunPaths, num_stages: int) -> dict:
    files = [paths.selection(k) for k in range(num_stages)] + [
        paths.scores(0),
        paths.probes(0),
        paths.influence_model(0) / "meta.json",
    ]
    return {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for f in files}


def test_repeating_a_finished_stage_function_does_no_work(tiny_run, tmp_path):
    """A re-delivered task calls a stage function again: nothing is redone or moved back."""
    import shutil

    shutil.copytree(tiny_run["dir"], tmp_path / "run")
    run = Run.open(tmp_path / "run", progress=False)
    n = run.cfg.stages.num_stages
    before = _snapshot(run.paths, n)
    transitions = [len(run.manifest.stage(k)["transitions"]) for k in range(n)]
    run.prepare()
    for k in range(n):
        run.train_stage(k)
        after = run.after_training(k)
        assert after == ("last" if k == n - 1 else "next")
    run.fit_stage(0)
    run.begin_scoring(0)
    run.score_shard(0, 0)
    run.select_stage(0)
    assert _snapshot(run.paths, n) == before
    m = read_json(run.paths.manifest)
    assert m["status"] == "done"
    assert [st["state"] for st in m["stages"]] == ["done"] * n
    assert [len(st["transitions"]) for st in m["stages"]] == transitions


def test_score_shard_out_of_range_and_missing_shard_are_named(tiny_run, tmp_path):
    import shutil

    from mates.errors import ArtifactError

    shutil.copytree(tiny_run["dir"], tmp_path / "run")
    run = Run.open(tmp_path / "run", progress=False)
    run.prepare()
    with pytest.raises(ArtifactError, match="shard 7 is out of range"):
        run.shard_ids(0, 7)
    run.paths.scores(0).unlink()
    run.paths.selection(1).unlink()
    run.paths.score_shard(0, 0).unlink()
    run.manifest.data["stages"][0]["state"] = "scoring"
    with pytest.raises(ArtifactError, match="score shard 0 is missing"):
        run.select_stage(0)


def test_score_shard_with_an_outside_scorer(tiny_run, tmp_path):
    """`score_texts` replaces the local model (how the workers call the HTTP scorer)."""
    import shutil

    shutil.copytree(tiny_run["dir"], tmp_path / "run")
    run = Run.open(tmp_path / "run", progress=False)
    run.prepare()
    path = run.paths.score_shard(0, 0)
    path.unlink()
    seen = {}

    def fake_scorer(ids, texts):
        seen["n"] = len(ids)
        assert all(isinstance(t, str) and t for t in texts)
        return [float(len(t)) for t in texts]

    run.score_shard(0, 0, fake_scorer)
    rows = read_jsonl(path)
    assert len(rows) == seen["n"] == run.cfg.stages.pool_docs
    assert rows[0]["score"] == float(len(run.corpus.text(run.corpus.index_of(rows[0]["id"]))))


@pytest.mark.slow
def test_hybrid_probing_records_agreement_and_warns_below_the_floor(tiny_config_factory, tmp_path):
    cfg = tiny_config_factory(
        "probing.method=hybrid",
        "probing.exact_subset=8",
        "probing.min_spearman=1.0",
        "stages.num_stages=2",
    )
    m = Run(cfg, tmp_path / "hybrid", progress=False).execute().data
    probes = m["stages"][0]["metrics"]["probes"]
    assert probes["method"] == "hybrid" and probes["exact_subset"] == 8
    assert -1.0 <= probes["first_order_spearman"] <= 1.0 and probes["probes_per_s"] > 0
    rows = read_jsonl(RunPaths(tmp_path / "hybrid").probes(0))
    assert len(rows) == cfg.probing.num_probes
    assert sum("exact" in r for r in rows) == 8
    events = RunPaths(tmp_path / "hybrid").events
    warned = events.is_file() and any(
        e["event"] == "first_order_disagrees" for e in read_jsonl(events)
    )
    assert warned == (probes["first_order_spearman"] < 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["first_order", "first_order_shift", "first_order_batch"])
def test_first_order_runs_end_to_end(tiny_config_factory, tmp_path, method):
    cfg = tiny_config_factory(f"probing.method={method}", "stages.num_stages=2")
    m = Run(cfg, tmp_path / method, progress=False).execute().data
    assert m["status"] == "done"
    assert m["stages"][0]["metrics"]["probes"]["method"] == method
    if method == "first_order_batch":  # the trainer clips the batch, not one document
        assert m["stages"][0]["metrics"]["probes"]["clipped_fraction"] == 0.0
    assert "exact" not in read_jsonl(RunPaths(tmp_path / method).probes(0))[0]


@pytest.mark.slow
def test_an_influence_model_below_the_quality_gate_falls_back_to_random(
    tiny_config_factory, tmp_path
):
    """16 probes cannot clear a bar of 0.99: stage 1 selects at random, says so in its
    selection manifest and in a run event, and the probes ran in fp32 with the shared-step
    effect recorded."""
    cfg = tiny_config_factory(
        "stages.num_stages=2",
        "selection.fallback=random",
        "selection.min_cv_spearman=0.99",
        "train.precision=bf16",
    )
    m = Run(cfg, tmp_path / "gate", progress=False).execute().data
    sel = read_json(RunPaths(tmp_path / "gate").selection(1))
    assert (
        sel["fallback"] == "random" and sel["sampler"] == "random" and sel["model_version"] is None
    )
    assert sel["gate"]["passed"] is False and sel["gate"]["min_cv_spearman"] == 0.99
    events = read_jsonl(RunPaths(tmp_path / "gate").events)
    assert [e["fallback"] for e in events if e["event"] == "influence_gate"] == ["random"]
    fit = m["stages"][0]["metrics"]["influence_model"]
    assert fit["cv_folds"] == 5 and fit["val_size"] == cfg.probing.num_probes
    probes = m["stages"][0]["metrics"]["probes"]
    assert probes["precision"] == "fp32" and np.isfinite(probes["shared_effect"])


def test_model_based_selections_standardize_scores_and_record_the_gate(tiny_run):
    sel = read_json(RunPaths(tiny_run["dir"]).selection(1))
    assert sel["score_std"] > 0 and "gate" in sel and "fallback" not in sel


def test_probe_history_fits_on_earlier_stages_probes_each_standardized(
    tiny_config_factory, tmp_path
):
    cfg = tiny_config_factory(
        "influence.encoder=ngram",
        "influence.train_encoder=false",
        "influence.head_fit=ridge",
        "influence.probe_history=1",
    )
    run = Run(cfg, tmp_path / "history", progress=False)
    manifest = run.execute().data
    n = cfg.probing.num_probes
    fits = [manifest["stages"][k]["metrics"]["influence_model"] for k in (0, 1)]
    assert [f["num_probes"] for f in fits] == [n, 2 * n]  # stage 0 has no earlier stage
    rows, y = run._fit_rows(1)
    assert [r["id"] for r in rows] == [
        r["id"]
        for r in read_jsonl(RunPaths(tmp_path / "history").probes(0))
        + read_jsonl(RunPaths(tmp_path / "history").probes(1))
    ]
    for part in (y[:n], y[n:]):  # each stage z-scored within itself
        assert part.mean() == pytest.approx(0, abs=1e-9) and part.std() == pytest.approx(1)
    plain = Run(tiny_config_factory(), tmp_path / "plain", progress=False)
    plain.ctx.paths = run.paths  # the same probes, read as a run without history reads them
    rows0, y0 = plain._fit_rows(1)
    assert len(rows0) == n and np.array_equal(
        y0, [r["influence"] for r in read_jsonl(run.paths.probes(1))]
    )
