"""`mates report`: a run's curves, timeline, influences and selections as one HTML file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mates.artifacts import RunPaths, read_json, read_jsonl, write_json
from mates.cli import main
from mates.errors import ArtifactError
from mates.report import (
    arm_overlays,
    charts,
    distribution_chart,
    loss_chart,
    render_report,
    run_view,
    sibling_arms,
    spearman_text,
    write_report,
)


def test_view_holds_every_stage_with_its_statistics(tiny_run):
    view = run_view(tiny_run["dir"])
    m, paths = tiny_run["manifest"], RunPaths(tiny_run["dir"])
    assert view["status"] == "done" and view["run_id"] == m["run_id"]
    assert [s["stage"] for s in view["stages"]] == list(range(len(m["stages"])))
    assert len(view["curve"]) == len(paths.metrics.read_text().splitlines())
    for st in view["stages"][:-1]:  # every stage but the last probes, fits, scores, selects
        met = m["stages"][st["stage"]]["metrics"]
        assert len(st["influences"]) == met["probes"]["count"]
        assert len(st["scores"]) == met["scores"]["count"]
        assert st["val_spearman"] == met["influence_model"]["val_spearman"]
        assert st["seconds"]["training"] == m["stages"][st["stage"]]["timings"]["training"]
        shares = st["domain_shift"]
        assert shares and abs(sum(d["pool"] for d in shares.values()) - 1) < 1e-9
        assert abs(sum(d["selected"] for d in shares.values()) - 1) < 1e-9
    assert view["stages"][0]["overlap_with_previous"] is None
    for k in range(1, len(view["stages"])):
        now = set(read_json(paths.selection(k))["ids"])
        before = set(read_json(paths.selection(k - 1))["ids"])
        assert view["stages"][k]["overlap_with_previous"] == len(now & before) / len(now)


def test_report_is_self_contained_with_every_chart(tiny_run, tmp_path):
    out = write_report(tiny_run["dir"], tmp_path / "r.html")
    text = out.read_text(encoding="utf-8")
    n = len(tiny_run["manifest"]["stages"])
    ids = set(re.findall(r'id="chart-([a-z]+(?:-\d+)?)"', text))
    assert {"loss", "timeline"} <= ids
    assert {f"distribution-{k}" for k in range(n - 1)} <= ids
    assert {f"domains-{k}" for k in range(1, n)} <= ids  # model-based selections only
    assert text.count("<svg") >= 2 + 2 * (n - 1)
    assert "<path" in text  # the charts drew something
    # nothing fetched from elsewhere: no scripts, stylesheets or images by reference
    assert not re.search(r"<(script|link|img)\b[^>]*(src|href)=", text)
    assert not re.search(r"(src|href)=\"https?://", text)


def test_an_unfinished_run_is_reported_as_far_as_it_got(tiny_run, tmp_path):
    run_dir = tmp_path / "partial"
    shutil.copytree(tiny_run["dir"], run_dir)
    paths = RunPaths(run_dir)
    m = read_json(paths.manifest)
    m["status"], m["current_stage"] = "failed", 2
    m["error"] = "stage 2 failed: disk full <sic>"
    last = m["stages"][-1]
    last.update(state="failed", metrics={}, timings={"training": 1.5}, error="disk full")
    write_json(paths.manifest, m)
    paths.selection(2).unlink()
    view = run_view(run_dir)
    assert view["stages"][-1]["state"] == "failed"
    assert view["stages"][-1]["overlap_with_previous"] is None
    html = render_report(view)
    assert "disk full &lt;sic&gt;" in html  # escaped, not markup
    assert "state-failed" in html
    assert set(charts(view)) >= {"loss", "timeline"}


def test_cli_writes_the_report_and_names_a_missing_run(tiny_run, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert main(["report", str(tiny_run["dir"]), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no run.json" in capsys.readouterr().err
    with pytest.raises(ArtifactError):
        run_view(tmp_path)


# --------------------------------------------------------------------------- a first reading


def copy_run(src: Path, dest: Path) -> Path:
    """A writable copy of a run's manifest, logs and small artifacts (no weights)."""
    shutil.copytree(
        src,
        dest,
        ignore=shutil.ignore_patterns(
            "checkpoint", "final-model", "influence-model", "tokenized", "tokenizer", "run.lock"
        ),
    )
    return dest


def hand_arm(
    src: Path, dest: Path, run_id: str, method: str = "random", shift: float = 0.1
) -> Path:
    """A run directory with `src`'s manifest and shifted metrics log, and nothing else."""
    m = read_json(RunPaths(src).manifest)
    m.update(run_id=run_id, name=run_id.rsplit("-", 1)[0])
    m["config"] = {**m["config"], "selection": {**m["config"]["selection"], "method": method}}
    dest.mkdir(parents=True)
    write_json(RunPaths(dest).manifest, m)
    rows = [json.loads(x) for x in RunPaths(src).metrics.read_text().splitlines()]
    RunPaths(dest).metrics.write_text(
        "".join(json.dumps({**r, "heldout_loss": r["heldout_loss"] + shift}) + "\n" for r in rows)
    )
    return dest


def comments(svg: str) -> list[str]:
    """The texts matplotlib drew (it writes each as an SVG comment beside its glyphs)."""
    return re.findall(r"<!-- (.*?) -->", svg)


def test_the_resolved_config_is_in_the_view_and_the_report(tiny_run):
    view, cfg = run_view(tiny_run["dir"]), tiny_run["cfg"]
    c = view["config"]
    assert c["selection_method"] == cfg.selection.method == "gumbel"
    assert (c["selection_ratio"], c["temperature"]) == (
        cfg.selection.ratio,
        cfg.selection.temperature,
    )
    assert (c["probe_method"], c["num_probes"], c["probe_lr"]) == (
        cfg.probing.method,
        cfg.probing.num_probes,
        cfg.probing.lr,
    )
    assert (c["influence_encoder"], c["influence_epochs"]) == (
        cfg.influence.encoder,
        cfg.influence.epochs,
    )
    per_step = cfg.train.batch_sequences * cfg.train.seq_tokens
    assert c["tokens_per_step"] == per_step
    steps = cfg.stages.stage0_steps + (cfg.stages.num_stages - 1) * cfg.stages.stage_steps
    assert c["total_tokens"] == per_step * steps == view["curve"][-1]["tokens"]
    text = render_report(view)
    table = re.search(r'<table class="config">.*?</table>', text, flags=re.S).group(0)
    assert (
        f"{cfg.train.batch_sequences} sequences × {cfg.train.seq_tokens} tokens = "
        f"{per_step:,} tokens per step"
    ) in table
    assert f"temperature τ = {cfg.selection.temperature:g}" in table
    assert f"{cfg.probing.num_probes} probes per stage" in table and "the current train lr" in table
    assert f"{cfg.stages.num_stages} stages: {cfg.stages.stage0_steps} steps in stage 0" in table
    if getattr(cfg.train, "cooldown_fraction", None):
        assert f"an lr cooldown over {cfg.train.cooldown_fraction:.0%} of a stage's steps" in table


def test_a_run_without_config_fields_still_renders(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run["dir"], tmp_path / "bare")
    m = read_json(RunPaths(run_dir).manifest)
    m["config"] = {"name": m["name"], "selection": {"method": "topk"}}
    write_json(RunPaths(run_dir).manifest, m)
    view = run_view(run_dir)
    assert view["config"]["tokens_per_step"] is None and view["config"]["temperature"] is None
    assert "topk, keep –" in render_report(view)
    m["config"] = {
        "name": m["name"],
        "selection": {"method": "mates", "sampler": "topk", "temperature": 2},
        "train": {"cooldown_fraction": 0},
    }
    write_json(RunPaths(run_dir).manifest, m)
    text = render_report(run_view(run_dir))
    assert "mates (topk sampler)" in text and "τ = 2 (used by the gumbel sampler only)" in text
    assert "no lr-cooldown evaluation" in text


def test_history_shows_every_transition_a_failure_and_the_resumption(tiny_run, tmp_path):
    view = run_view(tiny_run["dir"])
    hist = view["history"]
    assert hist[0]["what"] == "run created" and [h["at"] for h in hist] == sorted(
        h["at"] for h in hist
    )
    assert "pending" not in {h["what"] for h in hist}
    n_trans = sum(len(st["transitions"]) - 1 for st in tiny_run["manifest"]["stages"])
    assert sum(h["kind"] == "transition" for h in hist) == n_trans

    run_dir = copy_run(tiny_run["dir"], tmp_path / "resumed")
    paths = RunPaths(run_dir)
    m = read_json(paths.manifest)
    t = m["stages"][2]["transitions"][1]["at"]
    m["stages"][2]["transitions"] = [
        {"state": "pending", "at": m["created_at"]},
        {"state": "training", "at": t},
        {"state": "failed", "at": t + 5},
        {"state": "training", "at": t + 100},
        {"state": "done", "at": t + 110},
    ]
    write_json(paths.manifest, m)
    paths.events.write_text(
        json.dumps(
            {"at": t + 5.01, "stage": 2, "event": "failed", "reason": "OSError: <disk full>"}
        )
        + "\n"
        + json.dumps({"at": t + 50, "stage": 2, "event": "waiting for scorer", "error": "refused"})
        + "\n"
    )
    hist = run_view(run_dir)["history"]
    two = [(h["kind"], h["what"]) for h in hist if h["stage"] == 2]
    assert two == [
        ("transition", "training"),
        ("failed", "failed"),
        ("event", "waiting for scorer"),
        ("resumed", "training"),
        ("transition", "done"),
    ]
    failed = next(h for h in hist if h["kind"] == "failed")
    assert failed["detail"] == "OSError: <disk full>"  # the event's reason, listed once
    text = render_report(run_view(run_dir))
    items = re.search(r'<ol class="history">(.*?)</ol>', text, flags=re.S).group(1)
    assert "OSError: &lt;disk full&gt;" in items and "<disk full>" not in items
    assert "resumed (failed → training)" in items and "state-resumed" in items
    assert "waiting for scorer: refused" in items
    assert (
        items.count("<li>") == 1 + 2 + 4
    )  # created; stages 0 and 1; 2, its failure, wait, resumption


def test_a_stage_failed_now_shows_its_error_in_the_history(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run["dir"], tmp_path / "failed")
    paths = RunPaths(run_dir)
    m = read_json(paths.manifest)
    st = m["stages"][2]
    st["transitions"] = st["transitions"][:2] + [
        {"state": "failed", "at": st["transitions"][1]["at"] + 1}
    ]
    st.update(state="failed", error="RuntimeError: nan loss")
    m["status"] = "failed"
    write_json(paths.manifest, m)
    hist = run_view(run_dir)["history"]
    assert hist[-1]["kind"] == "failed" and hist[-1]["detail"] == "RuntimeError: nan loss"


def test_each_spearman_shows_its_points_and_too_few_are_flagged(tiny_run, tmp_path):
    from mates.influence import _split

    view = run_view(tiny_run["dir"])
    fit = tiny_run["manifest"]["stages"][0]["metrics"]["influence_model"]
    st = view["stages"][0]
    assert st["val_n"] == fit["val_size"]
    text = render_report(view)
    cell = spearman_text(st["val_spearman"], st["val_n"], interval=st.get("cv_interval"))
    assert f"(n={fit['val_size']})" in cell and ("too few to read" in cell) == (
        fit["val_size"] < 10
    )
    assert cell in text

    # an older fit report without val_size: the size is derived as the fit splits
    run_dir = copy_run(tiny_run["dir"], tmp_path / "derived")
    m = read_json(RunPaths(run_dir).manifest)
    met = m["stages"][0]["metrics"]
    for key in ("val_size", "cv_folds", "cv_low", "cv_high"):  # as fitted before cross-validation
        del met["influence_model"][key]
    met["influence_model"]["val_spearman"] = 0.41
    met["probes"]["count"] = 130
    write_json(RunPaths(run_dir).manifest, m)
    st = run_view(run_dir)["stages"][0]
    assert st["val_n"] == len(_split(130, m["config"]["influence"]["val_fraction"], 0)[1]) == 13
    assert spearman_text(0.41, 13) == "0.41 (n=13)"
    assert "0.41 (n=13)</td>" in render_report(run_view(run_dir))
    assert "too few" in spearman_text(0.9, 9) and spearman_text(None, 5) == "–"
    assert run_view(run_dir)["stages"][-1]["val_n"] is None  # the last stage fits nothing


def test_the_page_and_the_charts_say_lower_is_more_helpful(tiny_run):
    view = run_view(tiny_run["dir"])
    text = render_report(view)
    assert "LOWER influence / score = MORE HELPFUL" in text
    svg = distribution_chart(view["stages"][0])
    assert sum("lower = more helpful" in c for c in comments(svg)) == 2  # both histograms


def test_the_distribution_marks_what_the_selection_kept_and_its_cut(tiny_run, tmp_path):
    view = run_view(tiny_run["dir"])
    paths = RunPaths(tiny_run["dir"])
    st = view["stages"][0]
    kept_ids = set(read_json(paths.selection(1))["ids"])
    scores = {r["id"]: r["score"] for r in read_jsonl(paths.scores(0))}
    assert sum(st["kept"]) == len(kept_ids) == view["stages"][1]["selected"]
    kept = [scores[i] for i in kept_ids]
    assert st["cut"]["method"] == "gumbel"
    assert st["cut"]["score"] == pytest.approx(float(np.quantile(kept, 0.9)))
    drawn = comments(distribution_chart(st))
    assert f"kept by stage 1, n={len(kept_ids)}" in drawn
    assert any(c.startswith("90% of kept scores ≤ this") for c in drawn)
    assert view["stages"][-1]["kept"] is None and view["stages"][-1]["cut"] is None

    # a top-k selection keeps every score up to its cut
    run_dir = copy_run(tiny_run["dir"], tmp_path / "topk")
    sel = read_json(RunPaths(run_dir).selection(1))
    lowest = sorted(scores, key=scores.get)[: len(sel["ids"])]
    write_json(
        RunPaths(run_dir).selection(1), {**sel, "method": "mates", "sampler": "topk", "ids": lowest}
    )
    st = run_view(run_dir)["stages"][0]
    assert st["cut"]["score"] == max(scores[i] for i in lowest)
    assert all(s >= st["cut"]["score"] for i, s in scores.items() if i not in lowest)
    assert any(
        c.startswith("cut: every kept score ≤ this") for c in comments(distribution_chart(st))
    )
    write_json(RunPaths(run_dir).selection(1), {**sel, "method": "random", "sampler": "random"})
    assert run_view(run_dir)["stages"][0]["cut"] is None  # a random draw has no cut


def comparison(tiny_run, tmp_path) -> Path:
    """`mates compare`'s layout for one seed: the tiny run as `mates`, two hand-made arms,
    a folder that is no run, and a broken arm."""
    seed = tmp_path / "cmp" / "seed-0"
    mates = copy_run(tiny_run["dir"], seed / "mates")
    hand_arm(mates, seed / "random", "tiny-random-00000001")
    hand_arm(mates, seed / "dsir", "tiny-dsir-00000002", method="topk", shift=0.05)
    (seed / "logs").mkdir()
    (seed / "broken").mkdir()
    (seed / "broken" / "run.json").write_text("{")
    write_json(tmp_path / "cmp" / "comparison.json", {"seeds": [0]})
    return seed


def test_a_report_overlays_every_arm_of_its_comparison(tiny_run, tmp_path):
    seed = comparison(tiny_run, tmp_path)
    assert [p.name for p in sibling_arms(seed / "mates")] == ["random", "broken", "dsir"]
    assert [a["label"] for a in arm_overlays(seed / "mates")] == ["random", "dsir"]
    text = write_report(seed / "mates").read_text(encoding="utf-8")
    loss = re.search(r'id="chart-loss">(<svg.*?</svg>)', text, flags=re.S).group(1)
    assert {"held-out, random", "held-out, dsir"} <= set(comments(loss))
    assert "tiny-random-00000001" in text and "tiny-dsir-00000002" in text  # the arms table
    # every arm's report overlays the others, the random one's too
    text = write_report(seed / "random", tmp_path / "r.html").read_text(encoding="utf-8")
    assert {"held-out, mates", "held-out, dsir"} <= set(comments(text))
    # a given baseline is drawn alone, and reported below
    text = write_report(seed / "mates", tmp_path / "b.html", baseline_dir=seed / "dsir").read_text()
    assert "held-out, random" not in comments(text) and "Baseline arm" in text


def test_the_older_two_arm_layout_and_lone_runs(tiny_run, tmp_path):
    old = tmp_path / "old"
    copy_run(tiny_run["dir"], old / "mates")
    hand_arm(old / "mates", old / "random", "tiny-random-00000003")
    hand_arm(old / "mates", old / "other", "tiny-other-00000004")
    assert sibling_arms(old / "mates") == [old / "random"]
    assert sibling_arms(old / "random") == [] and sibling_arms(old / "other") == []


def test_arm_names_are_escaped(tiny_run, tmp_path):
    seed = tmp_path / "seed-1"
    copy_run(tiny_run["dir"], seed / "mates")
    hand_arm(seed / "mates", seed / "<b>x$y", "tiny-evil-00000005")
    text = write_report(seed / "mates").read_text(encoding="utf-8")
    assert "<b>x" not in text and "&lt;b&gt;x$y" in text


def test_cooldown_points_are_read_and_drawn(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run["dir"], tmp_path / "cool")
    paths = RunPaths(run_dir)
    for st in read_json(paths.manifest)["stages"]:
        paths.cooldown(st["stage"]).unlink(missing_ok=True)
    view = run_view(run_dir)
    assert all(st["cooldown"] is None for st in view["stages"])  # runs from before cooldowns
    assert not any("cooldown" in c for c in comments(loss_chart(view)))
    for st in read_json(paths.manifest)["stages"][:2]:
        k, tokens = st["stage"], st["metrics"]["tokens"]
        write_json(
            paths.cooldown(k),
            {
                "stage": k,
                "tokens": tokens,
                "primary": "heldout",
                "sets": {
                    "heldout": {"kind": "text", "loss": 5.0 - k, "accuracy": None},
                    "cloze": {"kind": "cloze", "loss": 1.0, "accuracy": 0.5},
                },
            },
        )
    view = run_view(run_dir)
    assert [st["cooldown"] and st["cooldown"]["loss"] for st in view["stages"]] == [5.0, 4.0, None]
    assert view["stages"][1]["cooldown"]["set"] == "heldout"
    svg = loss_chart(view)
    assert "after lr cooldown (heldout)" in comments(svg)
    text = render_report(view)
    assert "<td>5.000</td>" in text and "<td>4.000</td>" in text  # the stage table's column
