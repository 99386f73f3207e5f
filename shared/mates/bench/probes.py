"""Probing: the in-memory exact oracle against one that reloads the checkpoint per probe
(the reference code's way), and the first-order oracle."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mates.bench.common import Sizes, probe_docs, timed, trained
from mates.lm import autocast, lm_loss
from mates.probe import ExactOracle, FirstOrderOracle
from mates.run import Run
from mates.stats import spearman

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- probes


class ReloadingExactOracle:
    """The straightforward exact probe: reload the checkpoint from disk, take the step,
    then evaluate the reference set one example at a time."""

    def __init__(self, trainer, checkpoint: Path, reference, lr: float, precision: str):
        self.trainer, self.checkpoint, self.lr, self.precision = trainer, checkpoint, lr, precision
        self.reference = reference.to(trainer.device)
        self.base_loss = self._ref_loss()

    @torch.no_grad()
    def _ref_loss(self) -> float:
        model = self.trainer.model
        model.eval()
        ref, total = self.reference, 0.0
        for r in range(len(ref)):
            n = int(ref.lengths[r])
            with autocast(self.trainer.device, self.precision):
                total += float(
                    lm_loss(
                        model,
                        ref.input_ids[r : r + 1, :n],
                        ref.labels[r : r + 1, :n],
                        reduction="sum",
                    )
                )
        return total / ref.scored_tokens

    def influence(self, tokens: torch.Tensor) -> float:
        tr = self.trainer
        tr.load(self.checkpoint)
        model = tr.model
        model.train()
        x, y = tokens[None, :-1].to(tr.device), tokens[None, 1:].to(tr.device)
        with autocast(tr.device, self.precision):
            loss = lm_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr.cfg.grad_clip)
        for g in tr.optimizer.param_groups:
            g["lr"] = self.lr
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        return self._ref_loss() - self.base_loss


def bench_probes(run: Run, sizes: Sizes, work: Path) -> dict[str, Any]:
    tc = run.cfg.train
    trainer, stream = trained(run, steps=8)
    ck = work / "probe-checkpoint"
    trainer.save(
        ck,
        {"stage": 0, "stage_step": trainer.step, "complete": True, "stream": stream.state_dict()},
    )
    lr = run.cfg.probing.lr or trainer.current_lr
    kw = dict(
        lr=lr,
        grad_clip=tc.grad_clip,
        precision=tc.precision,
        eval_batch_sequences=tc.eval_batch_sequences,
    )
    docs = probe_docs(run, sizes.probes)
    reload_oracle = ReloadingExactOracle(trainer, ck, run.reference, lr, tc.precision)
    t = {"reload": 0.0, "exact": 0.0, "first": 0.0}
    n_reload = max(4, sizes.probes // 4)  # the slow arm on a subset: its rate is what matters
    vals: dict[str, list[float]] = {"exact": [], "first": []}
    for i, doc in enumerate(docs):  # alternate the arms probe by probe
        if i < n_reload:
            _, s = timed(partial(reload_oracle.influence, doc))
            t["reload"] += s
            # back to the checkpoint; the load replaces AdamW's state tensors, so the in-memory
            # arms are built again (untimed) on it. The first probe always takes this branch.
            trainer.load(ck)
            exact = ExactOracle(trainer.model, trainer.optimizer, run.reference, **kw)
            first = FirstOrderOracle(trainer.model, trainer.optimizer, run.reference, **kw)
        v, s = timed(partial(exact.influence, doc))
        vals["exact"].append(v)
        t["exact"] += s
        v, s = timed(partial(first.influence, doc))
        vals["first"].append(v)
        t["first"] += s
    n = len(docs)
    out = {
        "reference_size": len(run.reference),
        "reference_scored_tokens": run.reference.scored_tokens,
        "probes": n,
        "lr": lr,
        "exact_reload_per_s": n_reload / t["reload"],
        "exact_per_s": n / t["exact"],
        "first_order_per_s": n / t["first"],
        "first_order_spearman": float(spearman(np.array(vals["first"]), np.array(vals["exact"]))),
    }
    out["first_order_speedup"] = out["first_order_per_s"] / out["exact_per_s"]
    out["exact_speedup_over_reload"] = out["exact_per_s"] / out["exact_reload_per_s"]
    return out
