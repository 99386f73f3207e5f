"""The data influence model: fitted to stage k's probes (or, for 'static', stage 0's
reused), with its cost in the ledger."""

from __future__ import annotations

import copy
import shutil
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mates.artifacts import atomic_path, read_jsonl
from mates.context import Context
from mates.data.reference import reference_texts
from mates.errors import ArtifactError
from mates.flops import encoder_cost
from mates.influence import (
    Encoder,
    InfluenceModel,
    InfluenceScorer,
    fit_influence_model,
    load_encoder,
    report_dict,
)
from mates.ngram import NgramEncoder, NgramTokenizer

# Fitted n-gram encoders by (data fingerprint, reference examples, words read).
_NGRAM_ENCODERS: dict[tuple, NgramEncoder] = {}


class ModelSlot:
    """The influence model last fitted or loaded in this process, by stage, so that scoring
    right after a fit does not read it back from disk."""

    def __init__(self) -> None:
        self.held: tuple[int, InfluenceScorer] | None = None

    def get(self, ctx: Context, k: int) -> InfluenceScorer:
        if self.held is None or self.held[0] != k:
            self.held = (
                k,
                InfluenceScorer.load(
                    ctx.paths.influence_model(k), ctx.device, ctx.cfg.influence.precision
                ),
            )
        return self.held[1]


def new_encoder(ctx: Context) -> tuple[Encoder, Any]:
    """(encoder, tokenizer) of `influence.encoder`; 'ngram' is fitted on this run's reference
    set and whole corpus, once per process for the same data (the arms of a comparison)."""
    ic = ctx.cfg.influence
    if ic.encoder != "ngram":
        return load_encoder(ic.encoder, seed=ctx.cfg.seed)
    key = (ctx.cfg.fingerprint("data"), ctx.cfg.probing.max_reference_examples, ic.max_tokens)
    if key not in _NGRAM_ENCODERS:
        ref = reference_texts(
            ctx.cfg.data.reference,
            ctx.cfg.probing.max_reference_examples,
            ctx.cfg.data.reference_kind,
        )
        corpus = [ctx.corpus.text(i) for i in range(len(ctx.corpus))]
        _NGRAM_ENCODERS[key] = NgramEncoder.fit(ref, corpus, max_words=ic.max_tokens)
    enc = copy.deepcopy(_NGRAM_ENCODERS[key])
    return enc, NgramTokenizer(enc.config.num_buckets)


def new_scorer(ctx: Context, k: int) -> InfluenceScorer:
    ic = ctx.cfg.influence
    if ic.warm_start and k > 0 and (ctx.paths.influence_model(k - 1) / "meta.json").is_file():
        return InfluenceScorer.load(ctx.paths.influence_model(k - 1), ctx.device, ic.precision)
    encoder, tok = new_encoder(ctx)
    torch.manual_seed(ctx.cfg.seed + k)
    return InfluenceScorer(
        InfluenceModel(encoder), tok, ic.max_tokens, ctx.device, precision=ic.precision
    )


def fit(ctx: Context, slot: ModelSlot, k: int) -> None:
    """Fit stage k's influence model and save it as the run's version `<run_id>/<k>`."""
    if ctx.cfg.selection.method == "static" and k > 0:
        reuse_stage0_model(ctx, slot, k)
        return
    ic = ctx.cfg.influence
    rows, targets = fit_rows(ctx, k)
    scorer = new_scorer(ctx, k)
    texts = [ctx.corpus.text(ctx.corpus.index_of(r["id"])) for r in rows]
    bar = tqdm(total=ic.epochs, desc=f"stage {k} fit", disable=not ctx.progress, leave=False)
    report = fit_influence_model(
        scorer, texts, targets, ic, seed=ctx.cfg.seed + k, progress=bar.update
    )
    bar.close()
    run_id = ctx.manifest.run_id
    scorer.meta.update(run_id=run_id, stage=k, version=f"{run_id}/{k}", fit=report_dict(report))
    scorer.save(ctx.paths.influence_model(k), ic.encoder, ic.train_encoder)
    ctx.manifest.update_metrics(k, influence_model=report_dict(report))
    slot.held = (k, scorer)
    enc = encoder_cost(scorer.model.encoder, ic.max_tokens)
    # frozen: one forward per probe document (a ridge or SGD head on those features costs
    # next to nothing); fine-tuned: each of the k fold fits trains on (k-1)/k of the probes
    # for `epochs` and predicts its fold after each, then the refit trains best_epoch+1
    if ic.train_encoder:
        per_doc = (
            enc.train(ic.max_tokens) * ((ic.cv_folds - 1) * ic.epochs + report.best_epoch + 1)
            + enc.forward(ic.max_tokens) * ic.epochs
        )
    else:
        per_doc = enc.forward(ic.max_tokens)
    ctx.record_flops(k, "fit", per_doc * len(rows))
    ctx.manifest.update_metrics(k, encoder_flops_per_doc=enc.forward(ic.max_tokens))


def fit_rows(ctx: Context, k: int) -> tuple[list[dict], np.ndarray]:
    """The probes stage k's model is fitted on and their targets: stage k's influences,
    or with `influence.probe_history` h, those of stages k-h..k, each stage's z-scored
    within the stage (the scale of an influence changes from stage to stage)."""
    history = ctx.cfg.influence.probe_history
    rows: list[dict] = []
    parts: list[np.ndarray] = []
    for j in range(max(0, k - history), k + 1):
        stage_rows = read_jsonl(ctx.paths.probes(j))
        y = np.array([r["influence"] for r in stage_rows], dtype=np.float64)
        if j != k or history:
            spread = float(y.std())
            y = (y - y.mean()) / spread if spread > 0 else np.zeros_like(y)
        rows.extend(stage_rows)
        parts.append(y)
    return rows, np.concatenate(parts)


def reuse_stage0_model(ctx: Context, slot: ModelSlot, k: int) -> None:
    """'static': stage k scores with the influence model fitted at stage 0, unchanged."""
    src = ctx.paths.influence_model(0)
    if not (src / "meta.json").is_file():
        raise ArtifactError(f"stage {k}: 'static' needs stage 0's influence model ({src})")
    with atomic_path(ctx.paths.influence_model(k)) as tmp:
        shutil.copytree(src, tmp)
    stage0 = ctx.manifest.stage(0)["metrics"]
    ctx.manifest.update_metrics(
        k,
        influence_model={"reused_from_stage": 0},
        encoder_flops_per_doc=stage0.get("encoder_flops_per_doc"),
    )
    slot.held = None
