"""One MATES run: stages of train → probe → fit → score → select, resumable from artifacts.

Each step of a stage is skipped when its artifact already exists, so a resumed
run continues from the last completed step. Stage k trains on `selection(k)`;
its checkpoint is probed, an influence model is fitted and scores stage k+1's
pool, and the selection for stage k+1 is written. Stage 0 trains on a random
selection; the random arm selects at random throughout.
"""

from __future__ import annotations

import copy
import fcntl
import gc
import hashlib
import itertools
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mates.artifacts import (
    RunPaths,
    append_jsonl,
    atomic_path,
    read_json,
    read_jsonl,
    remove_stale_temporaries,
    repair_log,
    write_json,
    write_jsonl,
)
from mates.config import RunConfig, config_from_dict
from mates.data.corpus import TokenizedCorpus, iter_corpus, tokenize_corpus
from mates.data.packing import PackedStream
from mates.data.reference import load_heldout, load_reference, pack_rows, reference_texts
from mates.data.tokenizer import load_tokenizer, train_bpe
from mates.errors import ArtifactError, ConfigError, MatesError, RunStateError, StageFailed
from mates.flops import (
    TransformerCost,
    encoder_cost,
    exact_probe_flops,
    first_order_probe_flops,
    lm_cost,
    reference_gradient_flops,
)
from mates.influence import (
    InfluenceModel,
    InfluenceScorer,
    fit_influence_model,
    load_encoder,
    report_dict,
)
from mates.lm import build_lm, reference_loss, resolve_precision, row_losses
from mates.manifest import STAGE_STATES, Manifest, new_run_id
from mates.ngram import NgramEncoder, NgramTokenizer
from mates.probe import ExactOracle, FirstOrderOracle
from mates.selection import (
    fill_budget,
    join_scores,
    label_order,
    label_selection,
    select_indices,
    selection_order,
    target_label_mask,
)
from mates.stats import spearman
from mates.train import Callback, StepInfo, Trainer, world

log = logging.getLogger(__name__)

STAGE0_SECTIONS = ("seed", "data", "model", "train", "stages")
DDP_CANCEL_EVERY = 10  # steps between cancel checks under torchrun (each is a device sync)


# Frozen-encoder features by (encoder weights, length, precision), then by document text.
_FEATURES: dict[tuple, dict[bytes, torch.Tensor]] = {}
# Fitted n-gram encoders by (data fingerprint, reference examples, words read).
_NGRAM_ENCODERS: dict[tuple, NgramEncoder] = {}


def _encoder_key(scorer: InfluenceScorer) -> tuple:
    """Tells encoders apart by their weights (a checksum), so two runs share features only
    when their encoders would compute the same ones."""
    with torch.no_grad():
        enc = scorer.model.encoder
        total = sum(float(p.double().sum()) for p in itertools.chain(enc.parameters(), enc.buffers()))
    return (round(total, 6), scorer.max_tokens, scorer.resolved_precision())


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class Cancelled(MatesError):
    """The run was cancelled (a `cancel` file appeared in the run dir)."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`device` is 'cuda' but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class _EvalAndLog(Callback):
    """Evaluates reference and held-out loss every `eval_every_steps` and at stage end."""

    def __init__(self, run: Run, stage: int, losses: Sequence[float] = ()):
        self.run, self.stage = run, stage
        self.losses = list(losses)  # train losses since the last log row (restored on resume)
        self.bar = tqdm(total=run.stage_steps(stage), desc=f"stage {stage} train",
                        disable=not run.progress, leave=False)

    def step_end(self, trainer: Trainer, info: StepInfo) -> None:
        self.losses.extend(info.losses)  # read back at log, eval and checkpoint steps only
        self.bar.update(1)
        if info.losses:
            self.bar.set_postfix(loss=f"{info.losses[-1]:.3f}")
        every = self.run.cfg.train.eval_every_steps
        if info.stage_step % every == 0 and info.stage_step < self.run.stage_steps(self.stage):
            self._log(trainer, info)
        ck = self.run.cfg.train.checkpoint_every_steps
        if ck and info.stage_step % ck == 0 and info.stage_step < self.run.stage_steps(self.stage):
            self.run.save_checkpoint(self.stage, info.stage_step, complete=False,
                                     losses_since_log=self.losses)
        # alone, a stat per step; under DDP the ranks agree through an all-reduce whose
        # read-back waits for the device, so only every DDP_CANCEL_EVERY steps
        if self.run.world_size == 1 or info.stage_step % DDP_CANCEL_EVERY == 0:
            self.run.check_cancel()

    def train_end(self, trainer: Trainer, info: StepInfo | None) -> None:
        self.bar.close()
        if info is not None:
            self._log(trainer, info)

    def _log(self, trainer: Trainer, info: StepInfo) -> None:
        if not self.run.primary:
            self.losses.clear()
            return
        row = self.run.evaluate(self.stage, info.step, info.tokens)
        row.update(train_loss=round(float(np.mean(self.losses)), 5), lr=info.lr)
        self.losses.clear()
        append_jsonl(self.run.paths.metrics, row)


def init_run(cfg: RunConfig, root: Path) -> Manifest:
    """Create `<root>/<run_id>/` holding only the run's manifest (how the services start a run)."""
    run_id = new_run_id(cfg.name)
    paths = RunPaths(Path(root) / run_id)
    paths.root.mkdir(parents=True)
    return Manifest.create(paths.manifest, cfg.model_dump(mode="json"), cfg.fingerprint(),
                           cfg.stages.num_stages, run_id=run_id)


# How long a rank waits at a collective. The non-primary ranks wait at a barrier while
# rank 0 tokenizes the corpus of a fresh run, which takes longer than the NCCL default
# (10 minutes) on a large pool.
DIST_TIMEOUT = timedelta(hours=2)


def init_distributed(device_name: str) -> None:
    """Join the torchrun process group for a run configured with `device` `device_name`:
    NCCL with one GPU per local rank when the run is on CUDA, gloo when it is on the CPU
    (whatever GPUs the machine has)."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun local rank {local_rank} has no GPU of its own: this machine "
                              f"has {torch.cuda.device_count()}; use --nproc-per-node at most that, "
                              "or set `device: cpu`")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)


def train_stage_process(run_dir: Path, k: int) -> None:
    """Train stage k of an existing run in this process: alone, or as one rank under
    `torchrun --nproc-per-node N` (DDP: gloo on CPU, NCCL on CUDA; rank 0 writes)."""
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        manifest = read_json(RunPaths(Path(run_dir)).manifest)
        init_distributed(str(manifest["config"].get("device", "auto")))
        started = True
    try:
        run = Run.open(Path(run_dir), progress=False)
        if run.manifest.stage(k)["state"] != "done":
            with run.guard(k):
                run.prepare()
                run.train_stage(k)
    finally:
        if started:
            # Drop the DDP reducer before the process group: tearing both down together at
            # exit deadlocked gloo's threads on the GIL now and then.
            run = None
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


class Run:
    """One run: the stage functions, and `execute()`, which drives them in one process."""

    def __init__(self, cfg: RunConfig, out_dir: Path, *, progress: bool = True):
        self.cfg = cfg
        self.paths = RunPaths(Path(out_dir))
        self.progress = progress
        self.device = resolve_device(cfg.device)  # before the run dir is touched
        self.rank, self.world_size = world()
        self.primary = self.rank == 0  # under torchrun only rank 0 writes artifacts
        self.manifest = self._open_manifest()
        self.manifest.readonly = not self.primary
        self.trainer: Trainer | None = None
        self._trainer_at: tuple[int, int] | None = None  # (stage, stage_step) held in memory
        self._stream_k: PackedStream | None = None  # the stream of the stage being trained
        self._scorer: tuple[int, InfluenceScorer] | None = None  # last fitted model, by stage
        self._labels: np.ndarray | None = None  # 'label': which corpus documents match

    # -- set-up --------------------------------------------------------------

    def _open_manifest(self) -> Manifest:
        fp = self.cfg.fingerprint()
        if self.paths.manifest.is_file():
            m = Manifest.load(self.paths.manifest)
            if m.data["config_fingerprint"] != fp:
                raise ConfigError(
                    f"{self.paths.root} holds a run with a different config; "
                    "resume it with its own config or choose another --out"
                )
            return m
        self.paths.root.mkdir(parents=True, exist_ok=True)
        return Manifest.create(self.paths.manifest, self.cfg.model_dump(mode="json"), fp,
                               self.cfg.stages.num_stages)

    @classmethod
    def open(cls, run_dir: Path, progress: bool = True) -> Run:
        """Re-open an existing run dir with the config it was created with."""
        m = read_json(RunPaths(Path(run_dir)).manifest)
        return cls(config_from_dict(m["config"]), run_dir, progress=progress)

    def prepare(self) -> None:
        """Load the tokenizer, corpus and reference sets (built once, then read back).

        Under torchrun rank 0 builds the shared files first; the other ranks then read them.
        """
        if not self.primary:
            self._barrier()
        self._prepare_files()
        if self.primary:
            self._barrier()

    def _prepare_files(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        if cfg.data.tokenizer == "train-bpe":
            if (self.paths.tokenizer / "tokenizer.json").is_file():
                self.tokenizer = load_tokenizer(self.paths.tokenizer)
            else:
                texts = (r.text for r in iter_corpus(
                    cfg.data.pool, id_field=cfg.data.id_field, text_field=cfg.data.text_field,
                    domain_field=None, on_bad_row=cfg.data.on_bad_row))
                self.tokenizer = train_bpe(texts, cfg.data.vocab_size, self.paths.tokenizer)
        else:
            self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        d = cfg.data
        self.corpus: TokenizedCorpus = tokenize_corpus(
            d.pool, self.tokenizer, self.paths.tokenized, id_field=d.id_field,
            text_field=d.text_field, domain_field=d.domain_field, on_bad_row=d.on_bad_row,
            chunk_tokens=d.chunk_tokens)
        self._record_corpus()
        T = cfg.train.seq_tokens
        self.reference = load_reference(d.reference, self.tokenizer, T, cfg.probing.max_reference_examples,
                                        d.reference_kind)
        self.heldout_specs = {h.name: h for h in d.heldout_specs()}
        self.heldouts = {name: load_heldout(h, self.tokenizer, T) for name, h in self.heldout_specs.items()}
        self.eos = self.tokenizer.eos_token_id
        st = cfg.stages
        if st.pool_mode == "disjoint" and not st.token_budgets and st.num_stages * st.pool_docs > len(self.corpus):
            raise ConfigError(
                f"`stages.pool_docs` ({st.pool_docs}) x {st.num_stages} stages exceeds the corpus "
                f"({len(self.corpus)} documents); lower it or use `stages.pool_mode: resample`")
        self._order = np.random.default_rng([cfg.seed, 7]).permutation(len(self.corpus))
        if st.token_budgets:
            self._check_token_budgets()
        if cfg.selection.method == "label":
            self._label_mask()  # a target that matches nothing fails here, before any training

    def stage_need(self, k: int) -> int:
        """Tokens (each document counted with its EOS) that stage k's steps read in one epoch."""
        tc = self.cfg.train
        return self.stage_steps(k) * tc.batch_sequences * tc.seq_tokens + 1

    def pool_need(self, k: int) -> int:
        """Tokens of stage k's pool under token budgets: stage 0's budget, or a later stage's
        times `stages.pool_multiple`."""
        return self.stage_need(0) if k == 0 else int(np.ceil(self.cfg.pool_multiple * self.stage_need(k)))

    def _check_token_budgets(self) -> None:
        """Refuse budgets the corpus cannot fill before any training starts."""
        st, n = self.cfg.stages, self.cfg.stages.num_stages
        have = int(self.corpus.num_tokens().sum()) + len(self.corpus)  # an EOS after each unit
        if st.pool_mode == "disjoint":
            need = sum(self.pool_need(k) for k in range(n))
            what = (f"disjoint pools (`stages.pool_mode`) of `stages.stage0_tokens` ({st.stage0_tokens:,}) "
                    f"and {n - 1} x `stages.pool_multiple` ({self.cfg.pool_multiple:g}) x "
                    f"`stages.stage_tokens` ({st.stage_tokens:,})")
        else:  # a later pool draws from what earlier stages did not train on
            need = sum(self.stage_need(k) for k in range(n - 1)) + (self.pool_need(n - 1) if n > 1 else 0)
            what = (f"`stages.stage0_tokens` ({st.stage0_tokens:,}), the later stages' `stages.stage_tokens` "
                    f"({st.stage_tokens:,}) and a last pool of `stages.pool_multiple` "
                    f"({self.cfg.pool_multiple:g}) times that")
        if need > have:
            raise ConfigError(f"the corpus holds {have:,} tokens (EOS included) but {what} need {need:,} "
                              f"(whole batches of `train.batch_sequences` x `train.seq_tokens`); "
                              "lower the budgets or use a larger corpus")

    def _record_corpus(self) -> None:
        """The corpus's counts in run.json, rows skipped under `data.on_bad_row: skip` included."""
        meta = self.corpus.meta
        summary = {"documents": meta["num_docs"], "tokens": meta["num_tokens"],
                   "skipped_rows": meta.get("skipped_rows", 0),
                   "skip_reasons": meta.get("skip_reasons", {})}
        if summary["skipped_rows"]:
            log.warning("%d rows of %s were skipped (data.on_bad_row: skip): %s",
                        summary["skipped_rows"], self.cfg.data.pool, summary["skip_reasons"])
        if self.primary and self.manifest.data.get("corpus") != summary:
            self.manifest.data["corpus"] = summary
            self.manifest.save()

    def stage_steps(self, k: int) -> int:
        return self.cfg.stage_steps(k)

    def check_cancel(self) -> None:
        asked = self.paths.cancel.exists()
        if self.world_size > 1:  # every rank must stop at the same step
            flag = torch.tensor([int(asked)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
        if asked:
            raise Cancelled("run cancelled by request")

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # -- driving (the embedded default) ---------------------------------------

    def execute(self, seed_stage0_from: Path | None = None, prepared_from: Path | None = None,
                probes_from: Path | None = None) -> Manifest:
        """Run (or resume) every stage to the end in this process; returns the final manifest.

        `seed_stage0_from` copies stage 0 from another arm's run; that run, or
        `prepared_from`, also lends its tokenizer and tokenized corpus when its data settings
        are the same. `probes_from`, a model-based arm sharing that stage 0, lends the
        stage-0 probes and influence model (the same computation on the same checkpoint)."""
        with self._exclusive():
            return self._execute(seed_stage0_from, prepared_from, probes_from)

    def _execute(self, seed_stage0_from: Path | None, prepared_from: Path | None = None,
                 probes_from: Path | None = None) -> Manifest:
        if self.manifest.data["status"] == "done":
            raise RunStateError(f"run {self.manifest.run_id} is already done")
        removed = remove_stale_temporaries(self.paths.root)
        if removed:
            log.info("removed %d temporaries left by an interrupted process", removed)
        self.paths.cancel.unlink(missing_ok=True)
        self.manifest.set_status("running")
        n = self.cfg.stages.num_stages
        with self.guard(0):
            lender = seed_stage0_from or prepared_from
            if lender is not None:
                self._copy_prepared(Path(lender))
            self.prepare()
            if seed_stage0_from is not None:
                self._copy_stage0(Path(seed_stage0_from))
                if probes_from is not None:
                    self._copy_stage0_probes(Path(probes_from))
        for k in range(n):
            if self.manifest.stage(k)["state"] != "done":
                with self.guard(k):
                    self._run_stage(k)
        with self.guard(n - 1):
            self.finish()
        return self.manifest

    @contextmanager
    def _exclusive(self):
        """Hold the run dir's lock while executing: a second process refuses instead of
        writing alongside. The OS drops the lock when its holder dies, however it dies, so
        a killed run resumes at once although run.json still says 'running'."""
        path = self.paths.lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ArtifactError(f"cannot open {path}: {e.strerror}") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise RunStateError(f"run {self.manifest.run_id} is being executed by another "
                                    f"process (pid {holder}); cancel it or wait") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)

    def _run_stage(self, k: int) -> None:
        """The same stage functions the services call, one after another."""
        self.train_stage(k)
        if self.after_training(k) == "fit":
            self.fit_stage(k)
            self.begin_scoring(k)
            for shard in range(self.num_shards(k)):
                self.score_shard(k, shard)
                self.check_cancel()
            self.select_stage(k)

    # -- failure and cancellation ----------------------------------------------

    @contextmanager
    def guard(self, k: int, transient: tuple[type[BaseException], ...] = ()):
        """Record a failure or cancellation inside the block on stage k and the run.

        Exceptions of the `transient` types pass through unrecorded: the caller retries.
        A library error is re-raised as StageFailed naming the stage. Guards do not nest.
        """
        try:
            yield
        except transient:
            raise
        except Cancelled as e:
            self.mark_cancelled(k, str(e))
            raise
        except Exception as e:
            self.mark_failed(k, f"{type(e).__name__}: {e}")
            if isinstance(e, MatesError):
                raise StageFailed(f"stage {k} failed: {e}") from e
            raise

    def mark_cancelled(self, k: int, reason: str = "run cancelled by request") -> None:
        self._trainer_at = None  # memory may hold a half-trained stage
        self.manifest.end(k, "cancelled", reason)

    def mark_failed(self, k: int, reason: str) -> None:
        self._trainer_at = None
        self.manifest.end(k, "failed", reason)
        if self.primary:
            append_jsonl(self.paths.events, {"at": time.time(), "stage": k, "event": "failed",
                                         "reason": reason})

    def _moved_past(self, k: int, state: str) -> bool:
        """Stage k is already beyond `state` (a re-delivered task repeating an earlier step)."""
        now = self.manifest.stage(k)["state"]
        return now in STAGE_STATES and STAGE_STATES.index(now) > STAGE_STATES.index(state)

    @contextmanager
    def _state(self, k: int, state: str):
        if self._moved_past(k, state):
            yield  # its artifact exists, so the step skips its work
            return
        self.manifest.transition(k, state)
        t0 = time.perf_counter()
        yield
        self.manifest.add_timing(k, state, time.perf_counter() - t0)

    # -- the stage functions ----------------------------------------------------
    # Each is skipped where its artifact exists, so calling one twice does no work twice.
    # `prepare()` must have run in this process first.

    def train_stage(self, k: int) -> None:
        """Train stage k on its selection (stage 0 first draws its pool and a random one)."""
        self.check_cancel()
        if self.manifest.stage(k)["state"] != "done" and self.manifest.data["status"] != "running":
            self.manifest.set_status("running")
        if k == 0 and not self.paths.selection(0).is_file():
            if self.primary:
                self._write_pool(0)
                self._select(0, scores=None, method="random")
            self._barrier()
        with self._state(k, "training"):
            self._train(k)
        self._cooldown_eval(k)

    def after_training(self, k: int) -> str:
        """What follows stage k's training: 'fit' once probes are written, else stage k is done.

        The last stage ends here ('last'); the random arm, or a selection for stage k+1 that
        already exists, ends it too ('next').
        """
        self.check_cancel()
        p = self.paths
        if k + 1 == self.cfg.stages.num_stages:
            self.manifest.transition(k, "done")
            return "last"
        if not p.pool(k + 1).is_file():
            self._write_pool(k + 1)
        if not p.selection(k + 1).is_file() and not self.cfg.selection.model_based:
            with self._state(k, "selecting"):
                self._select_without_model(k + 1)
        if p.selection(k + 1).is_file():
            self.manifest.transition(k, "done")
            return "next"
        if self.cfg.selection.method == "static" and k > 0:
            return "fit"  # stage 0's model is reused: nothing to probe
        with self._state(k, "probing"):
            if not p.probes(k).is_file():
                self._probe(k)
        return "fit"

    def fit_stage(self, k: int) -> Path:
        """Fit the data influence model to stage k's probes; returns its directory."""
        self.check_cancel()
        with self._state(k, "fitting"):
            if not (self.paths.influence_model(k) / "meta.json").is_file():
                self._fit(k)
        return self.paths.influence_model(k)

    def begin_scoring(self, k: int) -> None:
        if not self._moved_past(k, "scoring"):
            self.manifest.transition(k, "scoring")

    def num_shards(self, k: int) -> int:
        """Scoring shards of stage k+1's pool."""
        n = len(read_json(self.paths.pool(k + 1))["ids"])
        return -(-n // self.cfg.influence.score_shard_docs)

    def shard_ids(self, k: int, shard: int) -> list[str]:
        per = self.cfg.influence.score_shard_docs
        ids = read_json(self.paths.pool(k + 1))["ids"][shard * per : (shard + 1) * per]
        if not ids:
            raise ArtifactError(f"stage {k}: shard {shard} is out of range ({self.num_shards(k)} shards)")
        return ids

    def score_shard(self, k: int, shard: int,
                    score_texts: Callable[[list[str], list[str]], Sequence[float]] | None = None) -> Path:
        """Score one shard of stage k+1's pool with stage k's influence model.

        `score_texts(ids, texts)` scores elsewhere (the HTTP scorer); by default the model
        is loaded here. Returns the shard's file.
        """
        out = self.paths.score_shard(k, shard)
        if out.is_file():
            return out
        ids = self.shard_ids(k, shard)
        if score_texts is not None:
            scores = [float(x) for x in score_texts(ids, [self.corpus.text(self.corpus.index_of(d)) for d in ids])]
            if len(scores) != len(ids):
                raise ArtifactError(f"stage {k} shard {shard}: {len(scores)} scores for {len(ids)} documents")
        else:
            scores = self._score_locally(k, ids).tolist()
        write_jsonl(out, ({"id": d, "score": s} for d, s in zip(ids, scores, strict=True)))
        return out

    def select_stage(self, k: int) -> None:
        """Merge the shard scores, select stage k+1's documents and close stage k."""
        p = self.paths
        if not p.selection(k + 1).is_file():
            st = self.manifest.stage(k)
            if "scoring" not in st["timings"]:
                started = [t["at"] for t in st["transitions"] if t["state"] == "scoring"]
                if started:
                    self.manifest.add_timing(k, "scoring", time.time() - started[-1])
            if not p.scores(k).is_file():
                self._merge_scores(k)
            per_doc = self.manifest.stage(k)["metrics"].get("encoder_flops_per_doc")
            if per_doc is not None:  # every pool document counted at influence.max_tokens
                self._record_flops(k, "score", per_doc * len(read_json(p.pool(k + 1))["ids"]))
            with self._state(k, "selecting"):
                s = self.cfg.selection
                gate = self._quality_gate(k)
                if gate["passed"] or s.fallback == "none":
                    self._select(k + 1, scores=read_jsonl(p.scores(k)), method=s.method,
                                 sampler=s.score_sampler, standardize=True, extra={"gate": gate})
                else:
                    self._select(k + 1, scores=None, method=s.method, sampler=s.fallback,
                                 extra={"gate": gate, "fallback": s.fallback})
        self.manifest.transition(k, "done")

    def _quality_gate(self, k: int) -> dict:
        """Whether stage k's influence model may select: the lower end of the interval of its
        cross-validated Spearman must lie above `selection.min_cv_spearman` ('static': stage
        0's model). A failed gate is logged as a run event; the caller falls back."""
        s = self.cfg.selection
        fit_stage = 0 if s.method == "static" else k
        fit = self.manifest.stage(fit_stage)["metrics"].get("influence_model") or {}
        gate = {"stage": fit_stage, "cv_spearman": fit.get("val_spearman"), "cv_low": fit.get("cv_low"),
                "cv_high": fit.get("cv_high"), "min_cv_spearman": s.min_cv_spearman}
        if "cv_folds" not in fit:  # fitted before cross-validation was recorded: nothing to gate on
            return {**gate, "passed": True, "reason": "no cross-validated Spearman recorded"}
        low = fit.get("cv_low")
        gate["passed"] = low is not None and low > s.min_cv_spearman
        if not gate["passed"]:
            rho = "undefined" if fit.get("val_spearman") is None else f"{fit['val_spearman']:.3f}"
            interval = ("" if low is None else
                        f" [{low:.3f}, {fit['cv_high']:.3f}] ")
            msg = (f"stage {k}: the influence model's cross-validated Spearman {rho}{interval}does not "
                   f"clear selection.min_cv_spearman = {s.min_cv_spearman}; stage {k + 1} selects "
                   + ("with the model anyway (selection.fallback: none)" if s.fallback == "none"
                      else f"by '{s.fallback}' instead (selection.fallback)"))
            gate["reason"] = msg
            log.warning(msg)
            if self.primary:
                append_jsonl(self.paths.events, {"at": time.time(), "stage": k, "event": "influence_gate",
                                                 "message": msg, "fallback": s.fallback})
        return gate

    def finish(self) -> None:
        """Export the final model and mark the run done."""
        self._export()
        self.manifest.set_status("done")

    # -- pools and selections ------------------------------------------------

    def _selected_before(self, k: int) -> set[int]:
        seen: set[int] = set()
        for j in range(k):
            seen.update(self.corpus.indices_of(read_json(self.paths.selection(j))["ids"]).tolist())
        return seen

    def _write_pool(self, k: int) -> None:
        st = self.cfg.stages
        if st.token_budgets:
            idx = self._token_pool(k)
        elif st.pool_mode == "disjoint":  # sizes checked up front in prepare()
            n = st.pool_docs
            idx = self._order[k * n : (k + 1) * n]
        else:
            used = self._selected_before(k)
            idx = np.array([i for i in self._order if int(i) not in used][: st.pool_docs], dtype=np.int64)
        if len(idx) == 0:
            raise StageFailed(f"stage {k}: no unused documents left for the pool")
        write_json(self.paths.pool(k), {"stage": k, "ids": [self.corpus.ids[i] for i in idx]})

    def _token_pool(self, k: int) -> np.ndarray:
        """Stage k's pool under token budgets: the next units of the run's corpus order until
        they hold `pool_need(k)` tokens; consecutive disjoint spans, or the units not yet
        trained on (`stages.pool_mode`)."""
        if self.cfg.stages.pool_mode == "disjoint":
            ends = np.cumsum(self.corpus.num_tokens(self._order) + 1)
            start = 0
            for j in range(k + 1):
                base = int(ends[start - 1]) if start else 0
                end = min(int(np.searchsorted(ends, base + self.pool_need(j))) + 1, len(ends))
                if j < k:
                    start = end
            return self._order[start:end]
        used = self._selected_before(k)
        candidates = np.array([i for i in self._order if int(i) not in used], dtype=np.int64)
        if len(candidates) == 0:
            return candidates
        idx, _ = fill_budget(np.arange(len(candidates)), self.corpus.num_tokens(candidates), self.pool_need(k))
        return candidates[idx]

    def _select(self, k: int, scores: list[dict] | None, method: str,
                sampler: str | None = None, temperature: float | None = None,
                extra: dict | None = None, chosen: np.ndarray | None = None,
                order: np.ndarray | None = None, standardize: bool = False,
                off_target: np.ndarray | None = None) -> None:
        """Write selection(k) from pool(k); scores are joined to the pool by document ID.

        `method` names the selection method, `sampler` how scores become a selection
        (gumbel, topk or random; default: the method itself); `chosen` skips sampling, and
        `order` (token budgets) gives the order in which documents are kept. Under token
        budgets a selection keeps documents in that order until they fill one epoch of the
        stage's steps; otherwise `selection.ratio` of the pool's documents.
        `standardize` z-scores the pool's scores first, so that τ means the same in every
        stage whatever the spread of the influence model's predictions. `off_target` (a mask
        over the pool) counts the kept documents it marks as `filled_at_random`.
        """
        s = self.cfg.selection
        pool_ids = read_json(self.paths.pool(k))["ids"]
        arr = join_scores(pool_ids, scores) if scores is not None else None
        if standardize and arr is not None:
            spread = float(arr.std())
            extra = {**(extra or {}), "score_mean": float(arr.mean()), "score_std": spread}
            arr = (arr - arr.mean()) / spread if spread > 0 else np.zeros_like(arr)
        sampler = sampler or method
        temperature = s.temperature if temperature is None else temperature
        seed = self._selection_seed(k)
        pool_idx = self.corpus.indices_of(pool_ids)
        budget: dict = {}
        if chosen is None and self.cfg.stages.token_budgets:
            if order is None:
                order = selection_order(arr, len(pool_ids), method=sampler, temperature=temperature, seed=seed)
            chosen, filled = fill_budget(order, self.corpus.num_tokens(pool_idx), self.stage_need(k))
            budget = {"budget_tokens": self.stage_need(k), "filled": filled}
            if not filled:
                log.warning("stage %d: the pool's %d documents do not fill the stage's %d tokens; "
                            "the stage repeats some of them", k, len(pool_ids), self.stage_need(k))
        elif chosen is None:
            chosen = select_indices(arr, len(pool_ids), ratio=s.ratio, method=sampler,
                                    temperature=temperature, seed=seed)
        if off_target is not None:
            extra = {**(extra or {}), "filled_at_random": int(off_target[chosen].sum())}
        ids = [pool_ids[i] for i in chosen]
        idx = self.corpus.indices_of(ids)
        manifest = {
            "stage": k, "method": method, "sampler": sampler, "seed": seed,
            "ratio": None if budget else s.ratio, **budget,
            "temperature": temperature if sampler == "gumbel" else None,
            "model_version": self._model_version(k - 1) if scores is not None and s.model_based else None,
            "pool_size": len(pool_ids), "selected": len(ids),
            "selected_tokens": int(self.corpus.num_tokens(idx).sum()),
            "pool_tokens": int(self.corpus.num_tokens(pool_idx).sum()),
            "stage_tokens": self.stage_steps(k) * self.cfg.train.batch_sequences * self.cfg.train.seq_tokens,
            "domains": self._domain_counts(idx), "pool_domains": self._domain_counts(pool_idx),
            **(extra or {}),
            "ids": ids,
        }
        write_json(self.paths.selection(k), manifest)
        self.manifest.update_metrics(k, selection={key: v for key, v in manifest.items() if key != "ids"})

    def _selection_seed(self, k: int) -> list[int]:
        """Stage 0's random selection takes the run's seed in every arm (it is shared);
        later ones `selection.seed` where set (an A/A arm)."""
        s = self.cfg.selection
        return [self.cfg.seed if k == 0 or s.seed is None else s.seed, k, 11]

    def _model_version(self, k: int) -> str:
        """The version of the influence model that scored stage k+1's pool ('static':
        stage 0's, whose meta it copied)."""
        meta = self.paths.influence_model(k) / "meta.json"
        version = read_json(meta).get("version") if meta.is_file() else None
        return version or f"{self.manifest.run_id}/{k}"

    def _select_without_model(self, k: int) -> None:
        """Selection(k) by a method that fits no influence model (random and the baselines)."""
        method = self.cfg.selection.method
        if method == "random":
            self._select(k, scores=None, method="random")
            return
        pool_ids = read_json(self.paths.pool(k))["ids"]
        idx = self.corpus.indices_of(pool_ids)
        t0 = time.perf_counter()
        if method == "label":
            mask = self._label_mask()[idx]
            extra = {"target_labels": self.cfg.selection.target_labels, "pool_matching": int(mask.sum())}
            if self.cfg.stages.token_budgets:
                self._select(k, scores=None, method="label", sampler="label",
                             order=label_order(mask, seed=self._selection_seed(k)), extra=extra,
                             off_target=~mask)
                return
            chosen, filled = label_selection(mask, ratio=self.cfg.selection.ratio,
                                             seed=self._selection_seed(k))
            self._select(k, scores=None, method="label", sampler="label", chosen=chosen,
                         extra={**extra, "filled_at_random": filled})
            return
        if method == "dsir":
            from mates.dsir import dsir_scores

            ref = reference_texts(self.cfg.data.reference, self.cfg.probing.max_reference_examples,
                                  self.cfg.data.reference_kind)
            values = dsir_scores(ref, [self.corpus.text(int(i)) for i in idx])
            # importance resampling proper: Gumbel-top-k at tau = 1 draws in proportion to the weight
            sampler, temperature = "gumbel", 1.0
        elif method == "perplexity":
            values = self._stage0_losses(idx, k - 1)
            sampler, temperature = "topk", None  # keep the lowest per-token losses
        else:  # pragma: no cover - config validation lists the methods
            raise ConfigError(f"`selection.method` {method!r} needs an influence model")
        rows = [{"id": d, "score": float(v)} for d, v in zip(pool_ids, values, strict=True)]
        self._select(k, scores=rows, method=method, sampler=sampler, temperature=temperature,
                     extra={"score_seconds": round(time.perf_counter() - t0, 3)})
        write_jsonl(self.paths.stage(k - 1) / f"{method}-scores.jsonl", rows)

    def _label_mask(self) -> np.ndarray:
        """Corpus documents whose label matches `selection.target_labels` (or a label below one)."""
        if self._labels is None:
            self._labels = target_label_mask(
                [self.corpus.domain(i) for i in range(len(self.corpus))], self.cfg.selection.target_labels,
                setting="`selection.target_labels`", field=self.cfg.data.domain_field)
        return self._labels

    def _stage0_losses(self, idx: np.ndarray, k: int) -> np.ndarray:
        """Per-token loss of each document (its first `seq_tokens`) under the stage-0 checkpoint."""
        T = self.cfg.train.seq_tokens
        tokens = [[self.eos] + self.corpus.token_ids(int(i))[: T - 1].tolist() for i in idx]
        ref = pack_rows([(t, len(t) - 1) for t in tokens], "pool", list(range(len(tokens))))
        model = build_lm(self.cfg.model, len(self.tokenizer), T, self.eos)
        model.load_state_dict(load_file(self.paths.checkpoint(0) / "model.safetensors"))
        model.to(self.device)
        tc = self.cfg.train
        sums, counts, _ = row_losses(model, ref, tc.eval_batch_sequences, tc.precision)
        per_doc = np.zeros(len(tokens))
        per_doc[ref.docs.numpy()] = (sums / counts.clamp(min=1)).numpy()
        self._record_flops(k, "select", self._eval_flops(ref))
        return per_doc

    def _domain_counts(self, idx: np.ndarray) -> dict[str, int]:
        return dict(sorted(Counter(self.corpus.domain(int(i)) or "-" for i in idx).items()))

    # -- compute ledger and cooldown evaluation ------------------------------------

    def _lm_cost(self) -> TransformerCost:
        if self.trainer is None:
            self.trainer = self._build_trainer()
        m = self.cfg.model
        return lm_cost(self.trainer.model, m.num_layers, m.hidden_size, self.cfg.train.seq_tokens)

    def _record_flops(self, k: int, phase: str, flops: float) -> None:
        """Stage k's analytic FLOPs of one phase (train, probe, fit, score, select, cooldown_eval)."""
        if not self.primary:
            return
        ledger = dict(self.manifest.stage(k)["metrics"].get("flops") or {})
        ledger[phase] = float(flops)
        self.manifest.update_metrics(k, flops=ledger)

    def _eval_flops(self, ref) -> float:
        """A forward over a token set whose loss is taken on its scored tokens only."""
        return self._lm_cost().forward(int(ref.lengths.sum()), ref.scored_tokens)

    def _cooldown_eval(self, k: int) -> None:
        """Branch from stage k's end, decay the lr linearly to zero over `train.cooldown_fraction`
        of a stage on its own selection, evaluate every held-out set, discard the branch."""
        frac = self.cfg.train.cooldown_fraction
        # rank 0 alone under torchrun: nothing in here may enter a collective (no cancel check)
        if not frac or not self.primary or self.paths.cooldown(k).is_file():
            return
        t0 = time.perf_counter()
        self._load_end_of(k)
        assert self.trainer is not None
        tc = self.cfg.train
        steps = max(1, round(frac * self.stage_steps(k)))
        ids = read_json(self.paths.selection(k))["ids"]
        stream = PackedStream(self.corpus, self.corpus.indices_of(ids), tc.seq_tokens, self.eos,
                              seed=self.cfg.seed * 1000 + k + 500_000)
        branch = self.trainer.cooldown_branch(stream, steps)
        sets = {}
        eval_flops = 0.0
        for name, ref in self.heldouts.items():
            sums, counts, correct = row_losses(branch, ref, tc.eval_batch_sequences, tc.precision)
            docs = ref.docs.numpy()
            doc_sums = np.bincount(docs, weights=sums.numpy(), minlength=ref.num_docs)
            doc_counts = np.bincount(docs, weights=counts.numpy(), minlength=ref.num_docs)
            kind = self.heldout_specs[name].kind
            sets[name] = {
                "kind": kind, "loss": round(float(sums.sum() / counts.sum()), 5),
                "accuracy": round(float(correct.float().mean()), 5) if kind == "cloze" else None,
                "scored_tokens": int(counts.sum()), "documents": int(ref.num_docs),
                "doc_sums": [round(float(x), 4) for x in doc_sums],
                "doc_counts": [int(x) for x in doc_counts],
            }
            eval_flops += self._eval_flops(ref)
        del branch
        seconds = time.perf_counter() - t0
        cooldown_tokens = steps * tc.batch_sequences * tc.seq_tokens
        primary = self.cfg.data.primary
        write_json(self.paths.cooldown(k), {
            "stage": k, "step": self.trainer.step, "tokens": self.trainer.tokens,
            "cooldown_steps": steps, "cooldown_tokens": cooldown_tokens, "primary": primary,
            "seconds": round(seconds, 3), "sets": sets,
        })
        self.manifest.add_timing(k, "cooldown_eval", seconds)
        self.manifest.update_metrics(k, cooldown={n: v["loss"] for n, v in sets.items()}
                                     | {"primary": primary, "steps": steps})
        self._record_flops(k, "cooldown_eval", self._lm_cost().train(cooldown_tokens) + eval_flops)

    # -- training ------------------------------------------------------------

    def _build_trainer(self) -> Trainer:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = build_lm(cfg.model, len(self.tokenizer), cfg.train.seq_tokens, self.eos)
        return Trainer(model, cfg.train, self.device)

    def _stream(self, k: int) -> PackedStream:
        ids = read_json(self.paths.selection(k))["ids"]
        return PackedStream(self.corpus, self.corpus.indices_of(ids), self.cfg.train.seq_tokens,
                            self.eos, seed=self.cfg.seed * 1000 + k)

    def _ensure_trainer_at(self, k: int) -> dict | None:
        """Hold the state from which stage k (re)starts; returns the checkpoint meta if loaded."""
        if self.trainer is None:
            self.trainer = self._build_trainer()
        ck = self.paths.checkpoint(k)
        if (ck / "trainer.json").is_file():
            meta = self.trainer.load(ck)
            self._trainer_at = (k, meta["stage_step"])
            self._truncate_metrics(meta["step"])
            return meta
        if k == 0:
            if self._trainer_at != (0, 0):
                self.trainer = self._build_trainer()
                self._trainer_at = (0, 0)
                self._truncate_metrics(0)
            return None
        if self._trainer_at != (k - 1, self.stage_steps(k - 1)):
            meta = self.trainer.load(self.paths.checkpoint(k - 1))
            self._trainer_at = (k - 1, meta["stage_step"])
            self._truncate_metrics(meta["step"])
        return None

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows logged after the state being resumed from."""
        path = self.paths.metrics
        if path.is_file() and self.primary:
            repair_log(path)
            rows = [r for r in read_jsonl(path) if r["step"] <= step]
            write_jsonl(path, rows)

    def _train(self, k: int) -> None:
        meta = self._ensure_trainer_at(k)
        stream = self._stream(k)
        start, losses = 0, []
        if meta:
            stream.load_state_dict(meta["stream"])
            start, losses = meta["stage_step"], meta.get("losses_since_log", [])
        assert self.trainer is not None
        if not (meta and meta.get("complete")):
            if self.trainer.step == 0 and not self.paths.metrics.is_file() and self.primary:
                append_jsonl(self.paths.metrics, self.evaluate(0, 0, 0))
            self._stream_k = stream
            self._trainer_at = None  # mid-stage until the end-of-stage checkpoint is written
            self.trainer.train(stream, self.stage_steps(k), [_EvalAndLog(self, k, losses)], stage_step=start)
            self.save_checkpoint(k, self.stage_steps(k), complete=True)
            self._barrier()
        # also when resuming from an end-of-stage checkpoint whose record a killed process missed
        if self.primary and "steps" not in self.manifest.stage(k)["metrics"]:
            last = read_jsonl(self.paths.metrics)[-1]
            self.manifest.update_metrics(
                k, steps=self.trainer.step, tokens=self.trainer.tokens,
                heldout_loss=last["heldout_loss"], reference_loss=last["reference_loss"],
                train_loss=last.get("train_loss"), selection_epochs=stream.epochs_started + 1,
                precision=resolve_precision(self.cfg.train.precision, self.device))
            tc = self.cfg.train
            self._record_flops(k, "train", self._lm_cost().train(self.stage_steps(k) * tc.batch_sequences * tc.seq_tokens))

    def save_checkpoint(self, k: int, stage_step: int, complete: bool,
                        losses_since_log: Sequence[float] = ()) -> None:
        assert self.trainer is not None and self._stream_k is not None
        if self.primary:
            # the losses since the last log row too: the next row's train_loss averages them
            self.trainer.save(self.paths.checkpoint(k), {
                "stage": k, "stage_step": stage_step, "complete": complete,
                "stream": self._stream_k.state_dict(), "losses_since_log": list(losses_since_log),
            })
        self._trainer_at = (k, stage_step)

    def evaluate(self, k: int, step: int, tokens: int) -> dict:
        assert self.trainer is not None
        tc = self.cfg.train
        model = self.trainer.model
        sets = {name: round(reference_loss(model, ref, tc.eval_batch_sequences, tc.precision), 5)
                for name, ref in self.heldouts.items()}
        return {
            "stage": k, "step": step, "tokens": tokens, "time": time.time(),
            "reference_loss": round(reference_loss(model, self.reference, tc.eval_batch_sequences, tc.precision), 5),
            "heldout_loss": sets[self.cfg.data.primary], "heldout": sets,
        }

    # -- probing, fitting, scoring -------------------------------------------

    def probe_documents(self, k: int) -> tuple[list[str], list[int], list[torch.Tensor]]:
        """The documents stage k's checkpoint is probed with, drawn from stage k+1's pool:
        their IDs, corpus indices and token IDs (EOS-terminated, at most seq+1 long)."""
        pool_ids = read_json(self.paths.pool(k + 1))["ids"]
        n = min(self.cfg.probing.num_probes, len(pool_ids))
        rng = np.random.default_rng([self.cfg.seed, k, 13])
        chosen = sorted(rng.choice(len(pool_ids), size=n, replace=False).tolist())
        ids = [pool_ids[j] for j in chosen]
        docs = [self.corpus.index_of(d) for d in ids]
        T = self.cfg.train.seq_tokens
        tokens = [torch.from_numpy(np.append(self.corpus.token_ids(i)[:T], self.eos).astype(np.int64))
                  for i in docs]
        return ids, docs, tokens

    def _probe(self, k: int) -> None:
        """Oracle influences of probe documents drawn from stage k+1's pool (`probing.method`)."""
        self._load_end_of(k)
        assert self.trainer is not None
        pc, tc = self.cfg.probing, self.cfg.train
        ids, docs, tokens = self.probe_documents(k)
        n = len(ids)
        kw = dict(lr=pc.lr or self.trainer.current_lr, grad_clip=tc.grad_clip,
                  precision=tc.precision if pc.precision == "train" else "fp32",
                  eval_batch_sequences=tc.eval_batch_sequences)
        model, opt = self.trainer.model, self.trainer.optimizer
        t0 = time.perf_counter()
        exact_idx: list[int] = []
        if pc.method == "exact":
            oracle = ExactOracle(model, opt, self.reference, **kw)
            values = self._each(oracle, tokens, f"stage {k} probe")
            exact_idx = list(range(n))
            exact_vals = values
        else:
            oracle = FirstOrderOracle(model, opt, self.reference, shift=pc.method == "first_order_shift",
                                      batch=pc.method == "first_order_batch", **kw)
            values = self._each(oracle, tokens, f"stage {k} probe (first-order)")
            if pc.method == "hybrid":
                m = min(pc.exact_subset, n)
                exact_idx = sorted(np.random.default_rng([self.cfg.seed, k, 17])
                                   .choice(n, size=m, replace=False).tolist())
                exact = ExactOracle(model, opt, self.reference, **kw)
                exact_vals = self._each(exact, [tokens[j] for j in exact_idx], f"stage {k} probe (exact)")
        seconds = time.perf_counter() - t0
        rows = []
        exact_of = dict(zip(exact_idx, exact_vals, strict=True)) if exact_idx else {}
        for j, (d, i, v) in enumerate(zip(ids, docs, values, strict=True)):
            row = {"id": d, "influence": float(v), "domain": self.corpus.domain(i)}
            if pc.method == "hybrid" and j in exact_of:
                row["exact"] = float(exact_of[j])
            rows.append(row)
        write_jsonl(self.paths.probes(k), rows)
        self._record_flops(k, "probe", self._probe_flops(tokens, exact_idx))
        summary = self._probe_summary(rows, oracle)
        summary.update(method=pc.method, seconds=round(seconds, 3), precision=kw["precision"],
                       shared_effect=float(oracle.shared_effect()),
                       probes_per_s=round(n / seconds, 3) if seconds > 0 else None)
        if pc.method == "hybrid":
            fo = np.array([values[j] for j in exact_idx])
            rho = spearman(fo, np.array(exact_vals))
            summary.update(exact_subset=len(exact_idx), first_order_spearman=round(float(rho), 4),
                           min_spearman=pc.min_spearman)
            if not rho >= pc.min_spearman:  # also catches NaN
                msg = (f"stage {k}: Spearman(first-order, exact) = {rho:.3f} on {len(exact_idx)} "
                       f"probes is below probing.min_spearman = {pc.min_spearman}: the first-order "
                       "approximation does not hold here (try a lower probing.lr or method exact)")
                log.warning(msg)
                if self.primary:
                    append_jsonl(self.paths.events, {"at": time.time(), "stage": k,
                                                     "event": "first_order_disagrees", "message": msg,
                                                     "spearman": float(rho)})
        self.manifest.update_metrics(k, probes=summary)

    def _probe_flops(self, tokens: list[torch.Tensor], exact_idx: list[int]) -> float:
        lm, ref = self._lm_cost(), self.reference
        ref_tokens, ref_scored = int(ref.lengths.sum()), ref.scored_tokens
        total = self._eval_flops(ref)  # the base reference loss
        if self.cfg.probing.method != "exact":
            total += reference_gradient_flops(lm, ref_tokens, ref_scored)
            total += sum(first_order_probe_flops(lm, len(t) - 1) for t in tokens)
        total += sum(exact_probe_flops(lm, len(tokens[j]) - 1, ref_tokens, ref_scored) for j in exact_idx)
        return total

    def _each(self, oracle, tokens: list[torch.Tensor], desc: str) -> list[float]:
        out = []
        for t in tqdm(tokens, desc=desc, disable=not self.progress, leave=False):
            out.append(float(oracle.influence(t)))
            self.check_cancel()
        return out

    def _probe_summary(self, rows: list[dict], oracle) -> dict:
        vals = np.array([r["influence"] for r in rows])
        by_domain: dict[str, list[float]] = {}
        for r in rows:
            by_domain.setdefault(r["domain"] or "-", []).append(r["influence"])
        return {
            "count": len(rows), "mean": float(vals.mean()), "std": float(vals.std()),
            "base_reference_loss": oracle.base_loss, "clipped_fraction": oracle.clipped / len(rows),
            "mean_by_domain": {d: round(float(np.mean(v)), 6) for d, v in sorted(by_domain.items())},
            "count_by_domain": {d: len(v) for d, v in sorted(by_domain.items())},
        }

    def _load_end_of(self, k: int) -> None:
        if self._trainer_at != (k, self.stage_steps(k)):
            if self.trainer is None:
                self.trainer = self._build_trainer()
            self.trainer.load(self.paths.checkpoint(k))
            self._trainer_at = (k, self.stage_steps(k))

    def _new_scorer(self, k: int) -> InfluenceScorer:
        ic = self.cfg.influence
        if ic.warm_start and k > 0 and (self.paths.influence_model(k - 1) / "meta.json").is_file():
            return InfluenceScorer.load(self.paths.influence_model(k - 1), self.device, ic.precision)
        encoder, tok = self.new_encoder()
        torch.manual_seed(self.cfg.seed + k)
        return InfluenceScorer(InfluenceModel(encoder), tok, ic.max_tokens, self.device,
                               precision=ic.precision)

    def new_encoder(self) -> tuple[torch.nn.Module, object]:
        """(encoder, tokenizer) of `influence.encoder`; 'ngram' is fitted on this run's reference
        set and whole corpus, once per process for the same data (the arms of a comparison)."""
        ic = self.cfg.influence
        if ic.encoder != "ngram":
            return load_encoder(ic.encoder, seed=self.cfg.seed)
        key = (self.cfg.fingerprint("data"), self.cfg.probing.max_reference_examples, ic.max_tokens)
        if key not in _NGRAM_ENCODERS:
            ref = reference_texts(self.cfg.data.reference, self.cfg.probing.max_reference_examples,
                                  self.cfg.data.reference_kind)
            corpus = [self.corpus.text(i) for i in range(len(self.corpus))]
            _NGRAM_ENCODERS[key] = NgramEncoder.fit(ref, corpus, max_words=ic.max_tokens)
        enc = copy.deepcopy(_NGRAM_ENCODERS[key])
        return enc, NgramTokenizer(enc.config.num_buckets)

    def _fit(self, k: int) -> None:
        if self.cfg.selection.method == "static" and k > 0:
            self._reuse_stage0_model(k)
            return
        rows, targets = self._fit_rows(k)
        scorer = self._new_scorer(k)
        texts = [self.corpus.text(self.corpus.index_of(r["id"])) for r in rows]
        bar = tqdm(total=self.cfg.influence.epochs, desc=f"stage {k} fit", disable=not self.progress, leave=False)
        report = fit_influence_model(scorer, texts, targets,
                                     self.cfg.influence, seed=self.cfg.seed + k, progress=bar.update)
        bar.close()
        scorer.meta.update(run_id=self.manifest.run_id, stage=k, version=f"{self.manifest.run_id}/{k}",
                           fit=report_dict(report))
        scorer.save(self.paths.influence_model(k), self.cfg.influence.encoder, self.cfg.influence.train_encoder)
        self.manifest.update_metrics(k, influence_model=report_dict(report))
        self._scorer = (k, scorer)
        ic = self.cfg.influence
        enc = encoder_cost(scorer.model.encoder, ic.max_tokens)
        # frozen: one forward per probe document (a ridge or SGD head on those features costs
        # next to nothing); fine-tuned: each of the k fold fits trains on (k-1)/k of the probes
        # for `epochs` and predicts its fold after each, then the refit trains best_epoch+1
        if ic.train_encoder:
            per_doc = (enc.train(ic.max_tokens) * ((ic.cv_folds - 1) * ic.epochs + report.best_epoch + 1)
                       + enc.forward(ic.max_tokens) * ic.epochs)
        else:
            per_doc = enc.forward(ic.max_tokens)
        self._record_flops(k, "fit", per_doc * len(rows))
        self.manifest.update_metrics(k, encoder_flops_per_doc=enc.forward(ic.max_tokens))

    def _fit_rows(self, k: int) -> tuple[list[dict], np.ndarray]:
        """The probes stage k's model is fitted on and their targets: stage k's influences,
        or with `influence.probe_history` h, those of stages k-h..k, each stage's z-scored
        within the stage (the scale of an influence changes from stage to stage)."""
        rows: list[dict] = []
        parts: list[np.ndarray] = []
        for j in range(max(0, k - self.cfg.influence.probe_history), k + 1):
            stage_rows = read_jsonl(self.paths.probes(j))
            y = np.array([r["influence"] for r in stage_rows], dtype=np.float64)
            if j != k or self.cfg.influence.probe_history:
                spread = float(y.std())
                y = (y - y.mean()) / spread if spread > 0 else np.zeros_like(y)
            rows.extend(stage_rows)
            parts.append(y)
        return rows, np.concatenate(parts)

    def _reuse_stage0_model(self, k: int) -> None:
        """'static': stage k scores with the influence model fitted at stage 0, unchanged."""
        src = self.paths.influence_model(0)
        if not (src / "meta.json").is_file():
            raise ArtifactError(f"stage {k}: 'static' needs stage 0's influence model ({src})")
        with atomic_path(self.paths.influence_model(k)) as tmp:
            shutil.copytree(src, tmp)
        stage0 = self.manifest.stage(0)["metrics"]
        self.manifest.update_metrics(k, influence_model={"reused_from_stage": 0},
                                     encoder_flops_per_doc=stage0.get("encoder_flops_per_doc"))
        self._scorer = None

    def _score_locally(self, k: int, ids: list[str]) -> np.ndarray:
        if self._scorer is not None and self._scorer[0] == k:
            scorer = self._scorer[1]
        else:
            scorer = InfluenceScorer.load(self.paths.influence_model(k), self.device,
                                          self.cfg.influence.precision)
            self._scorer = (k, scorer)
        idx = self.corpus.indices_of(ids)
        bs = self.cfg.influence.batch_size * 4
        # fine-tuned: features change per stage; a bag of n-grams: cheaper to compute than to keep
        if self.cfg.influence.train_encoder or self.cfg.influence.encoder == "ngram":
            return scorer.predict(scorer.tokenize([self.corpus.text(int(i)) for i in idx]), bs)
        return scorer.predict_features(self._frozen_features(scorer, idx, bs, None))

    def _merge_scores(self, k: int) -> None:
        """Join the shard files into `scores(k)`, in pool order; every shard must exist."""
        rows: list[dict] = []
        for shard in range(self.num_shards(k)):
            path = self.paths.score_shard(k, shard)
            if not path.is_file():
                raise ArtifactError(f"stage {k}: score shard {shard} is missing ({path})")
            rows.extend(read_jsonl(path))
        write_jsonl(self.paths.scores(k), rows)
        vals = np.array([r["score"] for r in rows])
        self.manifest.update_metrics(k, scores={"count": len(rows), "mean": float(vals.mean()),
                                                "std": float(vals.std())})

    def _frozen_features(self, scorer: InfluenceScorer, idx: np.ndarray, bs: int, progress) -> torch.Tensor:
        """A frozen encoder's features never change: compute each document's once per process,
        shared by every run in it that uses the same encoder weights (the arms of a comparison)."""
        cache = _FEATURES.setdefault(_encoder_key(scorer), {})
        keys = {int(i): _text_key(self.corpus.text(int(i))) for i in idx}
        todo = [i for i, key in keys.items() if key not in cache]
        if todo:
            feats = scorer.features(scorer.tokenize([self.corpus.text(i) for i in todo]), bs, progress)
            cache.update(zip((keys[i] for i in todo), feats, strict=True))
        return torch.stack([cache[keys[int(i)]] for i in idx])

    # -- stage-0 sharing and export -----------------------------------------

    def _copy_prepared(self, other: Path) -> None:
        """Take the trained tokenizer and the tokenized corpus of a run on the same data (both
        are deterministic functions of the data settings), instead of building them again."""
        src = RunPaths(other)
        theirs = config_from_dict(read_json(src.manifest)["config"])
        if theirs.fingerprint("data") != self.cfg.fingerprint("data"):
            return
        for path, mine, marker in ((src.tokenizer, self.paths.tokenizer, "tokenizer.json"),
                                   (src.tokenized, self.paths.tokenized, "meta.json")):
            if (path / marker).is_file() and not mine.exists():
                with atomic_path(mine) as tmp:
                    shutil.copytree(path, tmp)

    def _copy_stage0(self, other: Path) -> None:
        """Reuse another arm's stage 0 (random data, same seed and settings: identical by construction)."""
        if self.manifest.stage(0)["state"] == "done" or (self.paths.checkpoint(0) / "trainer.json").is_file():
            return
        src = RunPaths(other)
        theirs = config_from_dict(read_json(src.manifest)["config"])
        if theirs.fingerprint(*STAGE0_SECTIONS) != self.cfg.fingerprint(*STAGE0_SECTIONS):
            raise ConfigError(f"cannot share stage 0 with {other}: its data/model/train/stages/seed differ")
        for path in (src.pool(0), src.selection(0), src.cooldown(0), src.checkpoint(0)):  # the checkpoint last
            if path == src.cooldown(0) and not path.is_file():
                continue
            with atomic_path(self.paths.stage(0) / path.name) as tmp:
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, tmp)
        rows = [r for r in read_jsonl(src.metrics) if r["stage"] == 0]
        write_jsonl(self.paths.metrics, rows)
        theirs_stage0 = read_json(src.manifest)["stages"][0]
        for name in ("training", "cooldown_eval"):
            if name in theirs_stage0["timings"]:
                self.manifest.stage(0)["timings"][name] = theirs_stage0["timings"][name]
        flops = {k: v for k, v in (theirs_stage0["metrics"].get("flops") or {}).items()
                 if k in ("train", "cooldown_eval")}
        self.manifest.update_metrics(0, **{k: v for k, v in theirs_stage0["metrics"].items()
                                           if k not in ("probes", "influence_model", "scores", "flops",
                                                        "encoder_flops_per_doc")},
                                     flops=flops, shared_from=str(other))

    def _copy_stage0_probes(self, other: Path) -> None:
        """Take stage 0's probes and influence model from another model-based arm of the same
        seed: both probe the shared stage-0 checkpoint with the same documents of the same
        stage-1 pool, so the work would repeat bit for bit. Its metrics, FLOPs and wall
        seconds are copied too, so this arm's ledger still charges them."""
        p, src = self.paths, RunPaths(other)
        if not self.cfg.selection.model_based or p.probes(0).is_file() or self._moved_past(0, "fitting"):
            return
        theirs = config_from_dict(read_json(src.manifest)["config"])
        same = (*STAGE0_SECTIONS, "probing", "influence")
        if (theirs.fingerprint(*same) != self.cfg.fingerprint(*same) or not theirs.selection.model_based
                or not (src.influence_model(0) / "meta.json").is_file()):
            return
        stage0 = read_json(src.manifest)["stages"][0]
        with atomic_path(p.influence_model(0)) as tmp:
            shutil.copytree(src.influence_model(0), tmp)
            meta = read_json(tmp / "meta.json")  # this run's version of the same model
            meta.update(copied_from=meta.get("version"), run_id=self.manifest.run_id,
                        version=f"{self.manifest.run_id}/0")
            write_json(tmp / "meta.json", meta)
        with atomic_path(p.probes(0)) as tmp:  # last: its presence skips the probing
            shutil.copy2(src.probes(0), tmp)
        metrics = stage0["metrics"]
        flops = dict(self.manifest.stage(0)["metrics"].get("flops") or {})
        flops.update({k: v for k, v in (metrics.get("flops") or {}).items() if k in ("probe", "fit")})
        self.manifest.update_metrics(0, flops=flops, probes_shared_from=str(other),
                                     **{k: metrics[k] for k in ("probes", "influence_model", "encoder_flops_per_doc")
                                        if k in metrics})
        for name in ("probing", "fitting"):
            if name in stage0["timings"]:
                self.manifest.add_timing(0, name, stage0["timings"][name])

    def _export(self) -> None:
        """The final LM in `save_pretrained` form, loadable by AutoModelForCausalLM."""
        last = self.cfg.stages.num_stages - 1
        self._load_end_of(last)
        assert self.trainer is not None
        with atomic_path(self.paths.export()) as tmp:
            self.trainer.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        self.manifest.data["export"] = str(self.paths.export())
        self.manifest.save()
