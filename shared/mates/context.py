"""What every step of a run reads: the run's handle (config, directory, manifest, device,
process rank) and its data, built once by `prepare` (tokenizer, tokenized corpus,
reference and held-out sets, the corpus order pools are drawn from).

The step modules (`mates.stages.*`) are functions over a `Context`; `mates.run.Run` builds
one and calls them in the algorithm's order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mates.artifacts import RunPaths, append_jsonl
from mates.config import RunConfig
from mates.data.corpus import TokenizedCorpus, iter_corpus, tokenize_corpus
from mates.data.reference import ReferenceSet, load_heldout, load_reference
from mates.data.tokenizer import load_tokenizer, train_bpe
from mates.errors import ConfigError, MatesError
from mates.manifest import Manifest

log = logging.getLogger(__name__)


class Cancelled(MatesError):
    """The run was cancelled (a `cancel` file appeared in the run dir)."""


@dataclass
class Context:
    """One run in one process. The fields after `progress` are set by `prepare`."""

    cfg: RunConfig
    paths: RunPaths
    manifest: Manifest
    device: torch.device
    rank: int
    world_size: int
    progress: bool
    tokenizer: Any = None
    corpus: TokenizedCorpus = None  # type: ignore[assignment]
    reference: ReferenceSet = None  # type: ignore[assignment]
    heldout_specs: dict = field(default_factory=dict)
    heldouts: dict[str, ReferenceSet] = field(default_factory=dict)
    eos: int = -1
    order: np.ndarray = None  # type: ignore[assignment]  # the corpus order pools are drawn from
    labels: np.ndarray | None = None  # 'label': which corpus documents match, once asked
    tracker: Any = None  # mates.tracking.Tracker when `tracking:` names a backend (rank 0)

    @property
    def primary(self) -> bool:
        """Under torchrun only rank 0 writes artifacts."""
        return self.rank == 0

    # -- budgets ---------------------------------------------------------------

    def stage_steps(self, k: int) -> int:
        return self.cfg.stage_steps(k)

    def stage_need(self, k: int) -> int:
        """Tokens (each document counted with its EOS) that stage k's steps read in one epoch."""
        tc = self.cfg.train
        return self.stage_steps(k) * tc.batch_sequences * tc.seq_tokens + 1

    def pool_need(self, k: int) -> int:
        """Tokens of stage k's pool under token budgets: stage 0's budget, or a later stage's
        times `stages.pool_multiple`."""
        return (
            self.stage_need(0)
            if k == 0
            else int(np.ceil(self.cfg.pool_multiple * self.stage_need(k)))
        )

    # -- control and records -------------------------------------------------

    def check_cancel(self) -> None:
        asked = self.paths.cancel.exists()
        if self.world_size > 1:  # every rank must stop at the same step
            flag = torch.tensor([int(asked)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
        if asked:
            raise Cancelled("run cancelled by request")

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def record_flops(self, k: int, phase: str, flops: float) -> None:
        """Stage k's analytic FLOPs of one phase (train, probe, fit, score, select, cooldown_eval)."""
        if not self.primary:
            return
        ledger = dict(self.manifest.stage(k)["metrics"].get("flops") or {})
        ledger[phase] = float(flops)
        self.manifest.update_metrics(k, flops=ledger)

    def event(self, k: int, event: str, **fields: Any) -> None:
        """A line of the run's events.jsonl (rank 0 only)."""
        if self.primary:
            append_jsonl(
                self.paths.events, {"at": time.time(), "stage": k, "event": event, **fields}
            )

    # -- the data, built once ------------------------------------------------------

    def prepare(self) -> None:
        """Load the tokenizer, corpus and reference sets (built once, then read back).

        Under torchrun rank 0 builds the shared files first; the other ranks then read them.
        """
        if not self.primary:
            self.barrier()
        self.build_data()
        if self.primary:
            self.barrier()

    def build_data(self) -> None:
        """The data itself, in this process alone (`prepare` orders it under torchrun)."""
        cfg, d = self.cfg, self.cfg.data
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        if d.tokenizer == "train-bpe":
            if (self.paths.tokenizer / "tokenizer.json").is_file():
                self.tokenizer = load_tokenizer(self.paths.tokenizer)
            else:
                texts = (
                    r.text
                    for r in iter_corpus(
                        d.pool,
                        id_field=d.id_field,
                        text_field=d.text_field,
                        domain_field=None,
                        on_bad_row=d.on_bad_row,
                    )
                )
                self.tokenizer = train_bpe(texts, d.vocab_size, self.paths.tokenizer)
        else:
            self.tokenizer = load_tokenizer(d.tokenizer)
        self.corpus = tokenize_corpus(
            d.pool,
            self.tokenizer,
            self.paths.tokenized,
            id_field=d.id_field,
            text_field=d.text_field,
            domain_field=d.domain_field,
            on_bad_row=d.on_bad_row,
            chunk_tokens=d.chunk_tokens,
        )
        self._record_corpus()
        T = cfg.train.seq_tokens
        self.reference = load_reference(
            d.reference, self.tokenizer, T, cfg.probing.max_reference_examples, d.reference_kind
        )
        self.heldout_specs = {h.name: h for h in d.heldout_specs()}
        self.heldouts = {
            name: load_heldout(h, self.tokenizer, T) for name, h in self.heldout_specs.items()
        }
        self.eos = self.tokenizer.eos_token_id
        st = cfg.stages
        if (
            st.pool_mode == "disjoint"
            and not st.token_budgets
            and st.num_stages * st.pool_docs > len(self.corpus)
        ):
            raise ConfigError(
                f"`stages.pool_docs` ({st.pool_docs}) x {st.num_stages} stages exceeds the corpus "
                f"({len(self.corpus)} documents); lower it or use `stages.pool_mode: resample`"
            )
        self.order = np.random.default_rng([cfg.seed, 7]).permutation(len(self.corpus))
        if st.token_budgets:
            self._check_token_budgets()

    def _check_token_budgets(self) -> None:
        """Refuse budgets the corpus cannot fill before any training starts."""
        st, n = self.cfg.stages, self.cfg.stages.num_stages
        have = int(self.corpus.num_tokens().sum()) + len(self.corpus)  # an EOS after each unit
        if st.pool_mode == "disjoint":
            need = sum(self.pool_need(k) for k in range(n))
            what = (
                f"disjoint pools (`stages.pool_mode`) of `stages.stage0_tokens` ({st.stage0_tokens:,}) "
                f"and {n - 1} x `stages.pool_multiple` ({self.cfg.pool_multiple:g}) x "
                f"`stages.stage_tokens` ({st.stage_tokens:,})"
            )
        else:  # a later pool draws from what earlier stages did not train on
            need = sum(self.stage_need(k) for k in range(n - 1)) + (
                self.pool_need(n - 1) if n > 1 else 0
            )
            what = (
                f"`stages.stage0_tokens` ({st.stage0_tokens:,}), the later stages' `stages.stage_tokens` "
                f"({st.stage_tokens:,}) and a last pool of `stages.pool_multiple` "
                f"({self.cfg.pool_multiple:g}) times that"
            )
        if need > have:
            raise ConfigError(
                f"the corpus holds {have:,} tokens (EOS included) but {what} need {need:,} "
                f"(whole batches of `train.batch_sequences` x `train.seq_tokens`); "
                "lower the budgets or use a larger corpus"
            )

    def _record_corpus(self) -> None:
        """The corpus's counts in run.json, rows skipped under `data.on_bad_row: skip` included."""
        meta = self.corpus.meta
        summary = {
            "documents": meta["num_docs"],
            "tokens": meta["num_tokens"],
            "skipped_rows": meta.get("skipped_rows", 0),
            "skip_reasons": meta.get("skip_reasons", {}),
        }
        if summary["skipped_rows"]:
            log.warning(
                "%d rows of %s were skipped (data.on_bad_row: skip): %s",
                summary["skipped_rows"],
                self.cfg.data.pool,
                summary["skip_reasons"],
            )
        if self.primary and self.manifest.data.get("corpus") != summary:
            self.manifest.data["corpus"] = summary
            self.manifest.save()
