"""`mates bench`: each optimized hot path against the straightforward way, same process,
same inputs, timed alternately so that machine noise hits both arms alike.

- probe: exact influence with a checkpoint reload from disk and a Python loop over the
  reference examples per probe (how the reference code works), exact with the in-memory
  snapshot and one batched reference pass, and first-order; Spearman(first-order, exact).
- scorer: arrival order, padding to the global maximum, fp32, tokenizing in the loop,
  against length-bucketed, pre-tokenized, inference-mode scoring (bf16 weights where the
  CPU has bf16), eager and compiled.
- trainer: fp32, plain AdamW, eager attention, full-vocabulary logits and a host sync
  per step, against the Trainer (bf16 where asked, fused AdamW, SDPA, output layer only
  where needed, no per-step sync).
- overhead: from a tiny embedded run, (probe + fit + score + select) / training time.
"""

from __future__ import annotations

import gc
import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mates.config import PRESETS, load_config
from mates.data.packing import PackedStream
from mates.lm import autocast, lm_loss, resolve_precision
from mates.probe import ExactOracle, FirstOrderOracle
from mates.run import Run, resolve_device
from mates.stats import spearman

log = logging.getLogger(__name__)



@dataclass
class Sizes:
    probes: int
    reference: int
    scorer_docs: int
    trainer_steps: int
    rounds: int


QUICK = Sizes(probes=16, reference=256, scorer_docs=600, trainer_steps=6, rounds=3)
FULL = Sizes(probes=48, reference=256, scorer_docs=2000, trainer_steps=16, rounds=4)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- set-up


def _demo_run(work: Path, sizes: Sizes, device: str, progress: bool, reference: str) -> Run:
    """The demo preset on freshly built demo data, with a reference set of `sizes.reference`
    examples: the demo's own (LAMBADA-style: short contexts, continuation-only loss), or
    'text': that many full-length sequences of news text, loss on every token."""
    from mates.data.demo import build_demo
    from mates.data.reference import load_reference

    data = work / "data" / "demo"
    build_demo(data, seed=0, reference_examples=sizes.reference, progress=False)
    # the scorer benchmark measures a transformer encoder (MiniLM), whatever the demo scores
    # with: batching, precision and compilation are what it compares, and a bag of n-grams
    # has none of them
    cfg = load_config(PRESETS / "demo.yaml", [f"device={device}", "influence.encoder=minilm"],
                      base_dir=work)
    run = Run(cfg, work / "run", progress=progress)
    run.prepare()
    if reference == "text":
        T = cfg.train.seq_tokens
        news = [i for i in range(len(run.corpus)) if (run.corpus.domain(i) or "").startswith("news")]
        text, tokens = [], 0
        for i in news:
            if tokens > (T + 1) * sizes.reference:
                break
            text.append(run.corpus.text(i))
            tokens += int(run.corpus.num_tokens(np.array([i]))[0])
        path = work / "reference-text.txt"
        path.write_text("\n\n".join(text), encoding="utf-8")
        run.ctx.reference = load_reference(path, run.tokenizer, T, sizes.reference)
    return run


def _trained(run: Run, steps: int) -> tuple[Any, PackedStream]:
    """A demo-size LM a few steps into training, so AdamW has moments (the probes' state)."""
    trainer = run._build_trainer()
    ids = np.random.default_rng([run.cfg.seed, 5]).permutation(len(run.corpus))[:2000]
    stream = PackedStream(run.corpus, ids, run.cfg.train.seq_tokens, run.eos, seed=run.cfg.seed)
    for _ in range(steps):
        trainer.train_step(stream)
    return trainer, stream


def _probe_docs(run: Run, n: int) -> list[torch.Tensor]:
    rng = np.random.default_rng([run.cfg.seed, 9])
    idx = rng.choice(len(run.corpus), size=n, replace=False)
    T = run.cfg.train.seq_tokens
    return [torch.from_numpy(np.append(run.corpus.token_ids(int(i))[:T], run.eos).astype(np.int64))
            for i in idx]


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
                total += float(lm_loss(model, ref.input_ids[r:r + 1, :n], ref.labels[r:r + 1, :n],
                                       reduction="sum"))
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
    trainer, stream = _trained(run, steps=8)
    ck = work / "probe-checkpoint"
    trainer.save(ck, {"stage": 0, "stage_step": trainer.step, "complete": True,
                      "stream": stream.state_dict()})
    lr = run.cfg.probing.lr or trainer.current_lr
    kw = dict(lr=lr, grad_clip=tc.grad_clip, precision=tc.precision,
              eval_batch_sequences=tc.eval_batch_sequences)
    docs = _probe_docs(run, sizes.probes)
    reload_oracle = ReloadingExactOracle(trainer, ck, run.reference, lr, tc.precision)
    t = {"reload": 0.0, "exact": 0.0, "first": 0.0}
    n_reload = max(4, sizes.probes // 4)  # the slow arm on a subset: its rate is what matters
    vals: dict[str, list[float]] = {"exact": [], "first": []}
    for i, doc in enumerate(docs):  # alternate the arms probe by probe
        if i < n_reload:
            _, s = _timed(lambda d=doc: reload_oracle.influence(d))
            t["reload"] += s
            # back to the checkpoint; the load replaces AdamW's state tensors, so the in-memory
            # arms are built again (untimed) on it. The first probe always takes this branch.
            trainer.load(ck)
            exact = ExactOracle(trainer.model, trainer.optimizer, run.reference, **kw)
            first = FirstOrderOracle(trainer.model, trainer.optimizer, run.reference, **kw)
        v, s = _timed(lambda d=doc, o=exact: o.influence(d))
        vals["exact"].append(v)
        t["exact"] += s
        v, s = _timed(lambda d=doc, o=first: o.influence(d))
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


# --------------------------------------------------------------------------- scorer


def mixed_lengths(texts: list[str], seed: int) -> list[str]:
    """Each text cut after a random number of its paragraphs (blank-line separated), uniform
    from one to all: real text at natural cut points, from a headline to the whole document.

    The demo's documents are long (95% of them reach a 128-token window whole), so as they
    are they leave length bucketing nothing to remove; this is the mixed-length set the
    scorer's target is stated on.
    """
    rng = np.random.default_rng([seed, 4])
    out = []
    for text in texts:
        paragraphs = text.split("\n\n")
        out.append("\n\n".join(paragraphs[: int(rng.integers(1, len(paragraphs) + 1))]))
    return out


def _score_arms(arms: dict[str, Callable[[list[str]], np.ndarray]], texts: list[str],
                rounds: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Seconds and scores of each arm over `texts`, the arms taking turns on each chunk."""
    t = dict.fromkeys(arms, 0.0)
    out = {arm: np.empty(len(texts)) for arm in arms}
    for chunk in np.array_split(np.arange(len(texts)), rounds):
        part = [texts[i] for i in chunk]
        for arm, fn in arms.items():
            v, sec = _timed(lambda p=part, f=fn: f(p))
            out[arm][chunk] = v
            t[arm] += sec
    return t, out


def bench_scorer(run: Run, sizes: Sizes) -> dict[str, Any]:
    """Naive against bucketed scoring (eager and compiled) on two sets of the same demo
    documents: cut to mixed lengths (`mixed_lengths`; the top-level keys), and whole
    (`at_cap`: nearly all of them fill the window, so only the precision can help)."""
    from mates.baselines import naive_predict
    from mates.influence import InfluenceModel, InfluenceScorer, fast_predict

    ic = run.cfg.influence
    encoder, tok = run.new_encoder()
    torch.manual_seed(run.cfg.seed)
    scorer = InfluenceScorer(InfluenceModel(encoder), tok, ic.max_tokens, run.device)
    rng = np.random.default_rng([run.cfg.seed, 3])
    idx = rng.choice(len(run.corpus), size=min(sizes.scorer_docs, len(run.corpus)), replace=False)
    whole = [run.corpus.text(int(i)) for i in idx]
    mixed = mixed_lengths(whole, run.cfg.seed)
    bs = 64
    # the same model compiled (what MATES_SCORER_COMPILE=1 gives the scorer service)
    compiled = InfluenceScorer(scorer.model, tok, ic.max_tokens, run.device, compile=True)
    naive_predict(scorer, whole[:8], bs)  # warm-up of the eager arms
    fast_predict(scorer, whole[:8], bs)
    # the compile, on two batch shapes (the second makes the shapes dynamic): timed apart
    _, compile_s = _timed(lambda: (fast_predict(compiled, whole[:8], bs),
                                   fast_predict(compiled, mixed[8:13], bs)))
    arms = {"naive": lambda p: naive_predict(scorer, p, bs),
            "fast": lambda p: fast_predict(scorer, p, bs),
            "compiled": lambda p: fast_predict(compiled, p, bs)}

    def measured(texts: list[str]) -> dict[str, Any]:
        if run.device.type == "cuda":
            # untimed pass: on a GPU the first batch of each new shape pays for kernel
            # selection, and the bucketed arm meets many shapes on the mixed set (the first
            # H200 run timed it at 0.4x of naive that way, 2.1x on whole documents)
            _score_arms(arms, texts, 1)
        t, out = _score_arms(arms, texts, sizes.rounds)
        tokens = np.array([len(x) for x in scorer.tokenize(texts)])
        return {
            "tokens_mean": float(tokens.mean()),
            "tokens_p10_p50_p90": [int(v) for v in np.percentile(tokens, [10, 50, 90])],
            "at_window": float(np.mean(tokens >= ic.max_tokens)),
            "naive_docs_per_s": len(texts) / t["naive"],
            "docs_per_s": len(texts) / t["fast"],
            "speedup": t["naive"] / t["fast"],
            "max_abs_diff": float(np.max(np.abs(out["naive"] - out["fast"]))),
            "compiled_docs_per_s": len(texts) / t["compiled"],
            "compiled_speedup": t["naive"] / t["compiled"],
            "compiled_max_abs_diff": float(np.max(np.abs(out["naive"] - out["compiled"]))),
        }

    return {
        "docs": len(whole), "encoder": ic.encoder, "max_tokens": ic.max_tokens, "batch_size": bs,
        "precision": scorer.resolved_precision(), "set": "mixed lengths (paragraph cuts)",
        **measured(mixed), "compile_s": compile_s,
        "at_cap": {"set": "whole documents", **measured(whole)},
    }


def matmul_gflops(device: torch.device, n: int | None = None, reps: int = 10) -> dict[str, float]:
    """GFLOP/s of an n x n matrix product in fp32 and bf16: the ceiling that bf16 can lift a
    model-bound path by on this machine (about 2.3x on AVX-512 BF16, more with AMX). n
    defaults to 1024 on a CPU, 8192 on a GPU (smaller products only time the launches)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        _sync(device)
        _, sec = _timed(lambda a=a, b=b: ([a @ b for _ in range(reps)], _sync(device)))
        out[name] = round(2 * n**3 * reps / sec / 1e9, 1)
    return out


# --------------------------------------------------------------------------- trainer


def bench_trainer(run: Run, sizes: Sizes) -> dict[str, Any]:
    from mates.baselines import NaiveTrainer

    cfg = run.cfg
    tc = cfg.train
    ids = np.random.default_rng([cfg.seed, 6]).permutation(len(run.corpus))[:2000]
    fast, _ = _trained(run, steps=0)
    naive = NaiveTrainer.for_run(run)
    s_fast = PackedStream(run.corpus, ids, tc.seq_tokens, run.eos, seed=1)
    s_naive = PackedStream(run.corpus, ids, tc.seq_tokens, run.eos, seed=1)
    for tr, st in ((fast, s_fast), (naive, s_naive)):  # warm-up
        tr.train_step(st)
    _sync(run.device)
    t_fast = t_naive = 0.0
    per = max(1, sizes.trainer_steps // sizes.rounds)
    steps = 0
    for _ in range(sizes.rounds):
        t0 = time.perf_counter()
        for _ in range(per):
            naive.train_step(s_naive)
        _sync(run.device)
        t_naive += time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(per):
            loss = fast.train_step(s_fast)  # a device tensor: no sync inside the step
        float(loss)  # the host waits for the last step, as a read-back would
        _sync(run.device)
        t_fast += time.perf_counter() - t0
        steps += per
    tokens = steps * tc.batch_sequences * tc.seq_tokens
    return {
        "precision": resolve_precision(tc.precision, run.device), "batch": f"{tc.batch_sequences}x{tc.seq_tokens}",
        "parameters": sum(p.numel() for p in fast.model.parameters()),
        "steps": steps,
        "naive_tokens_per_s": tokens / t_naive,
        "tokens_per_s": tokens / t_fast,
        "speedup": t_naive / t_fast,
    }


# --------------------------------------------------------------------------- presets (MFU)

# Dense bf16 peak of one GPU, TFLOP/s (vendor datasheets, without sparsity), matched
# against torch.cuda.get_device_name in this order; --peak-tflops overrides it.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
                    ("H200", 989.4), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))
PRESET_VOCAB = 50277  # Pythia's tokenizer, for presets whose tokenizer is not here (the preset pads it)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def train_flops_per_token(model: torch.nn.Module, num_layers: int, hidden_size: int,
                          seq_tokens: int) -> float:
    """Model FLOPs of one training token: 6·N + 12·L·d·T (PaLM, Chowdhery et al. 2022, app. B).

    N counts the parameters that do matmuls: all but the input embedding, which is a
    lookup (Pythia's output embedding is untied, and is counted).
    """
    emb = model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters()) - emb
    return 6.0 * n + 12.0 * num_layers * hidden_size * seq_tokens


class RandomTokens:
    """A stream of uniformly random token batches (throughput does not depend on the text)."""

    def __init__(self, vocab_size: int, seq_tokens: int, seed: int = 0):
        self.vocab_size, self.seq_tokens = vocab_size, seq_tokens
        self.gen = torch.Generator().manual_seed(seed)

    def next_block(self, n_sequences: int) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (n_sequences, self.seq_tokens + 1), generator=self.gen)


def bench_preset(config: Path, device: str, steps: int, peak: float | None) -> dict[str, Any]:
    """Trainer tokens/s and MFU for a preset's model and batch, on random tokens."""
    from mates.lm import build_lm
    from mates.train import Trainer

    cfg = load_config(config, [f"device={device}"])
    dev = resolve_device(cfg.device)
    if dev.type == "cuda":  # this preset's peak memory, not an earlier section's
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    tc, mc = cfg.train, cfg.model
    vocab = cfg.data.vocab_size if cfg.data.tokenizer == "train-bpe" else PRESET_VOCAB
    torch.manual_seed(cfg.seed)
    trainer = Trainer(build_lm(mc, vocab, tc.seq_tokens, eos_id=0), tc, dev)
    stream = RandomTokens(vocab, tc.seq_tokens, cfg.seed)
    float(trainer.train_step(stream))  # warm-up: kernels, allocator, compile if asked
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = trainer.train_step(stream)
    float(loss)
    _sync(dev)
    seconds = time.perf_counter() - t0
    tokens_per_s = steps * tc.batch_sequences * tc.seq_tokens / seconds
    flops = train_flops_per_token(trainer.model, mc.num_layers, mc.hidden_size, tc.seq_tokens)
    peak = peak if peak is not None else peak_tflops(dev)
    out = {
        "config": str(config), "name": cfg.name, "device": str(dev),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "batch": f"{tc.batch_sequences}x{tc.seq_tokens}", "micro_batch": tc.micro_batch_sequences,
        "precision": resolve_precision(tc.precision, dev), "compile": tc.compile, "steps": steps,
        "seconds_per_step": seconds / steps, "tokens_per_s": tokens_per_s,
        "flops_per_token": flops, "achieved_tflops": tokens_per_s * flops / 1e12,
        "peak_tflops": peak, "mfu": None if not peak else tokens_per_s * flops / (peak * 1e12),
    }
    if dev.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out


# --------------------------------------------------------------------------- overhead


def bench_overhead(work: Path, device: str, progress: bool) -> dict[str, Any]:
    from mates.data.demo import build_demo

    base = work / "tiny"
    build_demo(base / "data" / "demo", seed=0, pool_news_articles=100, progress=False)
    cfg = load_config(PRESETS / "tiny.yaml", [f"device={device}"], base_dir=base)
    m = Run(cfg, base / "run", progress=progress).execute().data
    keys = ("probing", "fitting", "scoring", "selecting")
    train = sum(st["timings"].get("training", 0.0) for st in m["stages"])
    parts = {k: sum(st["timings"].get(k, 0.0) for st in m["stages"]) for k in keys}
    return {"config": "configs/tiny.yaml", "probing_method": cfg.probing.method,
            "training_s": train, **{f"{k}_s": v for k, v in parts.items()},
            "selection_fraction": sum(parts.values()) / train}


# --------------------------------------------------------------------------- driver


def run_bench(quick: bool, device: str = "cpu", progress: bool = False,
              sections: tuple[str, ...] = ("probe", "scorer", "trainer", "overhead"),
              reference: str = "demo", presets: tuple[Path, ...] = (), preset_steps: int = 5,
              peak: float | None = None) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    dev = resolve_device(device)
    out: dict[str, Any] = {
        "device": str(dev), "quick": quick,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
                    "matmul_gflops": matmul_gflops(dev)},
    }
    work = Path(tempfile.mkdtemp(prefix="mates-bench-"))
    try:
        run = (_demo_run(work, sizes, device, progress, reference)
               if set(sections) - {"overhead", "presets"} else None)
        for name, fn in (("probe", lambda: bench_probes(run, sizes, work)),
                         ("scorer", lambda: bench_scorer(run, sizes)),
                         ("trainer", lambda: bench_trainer(run, sizes)),
                         ("overhead", lambda: bench_overhead(work, device, progress))):
            if name in sections:
                t0 = time.perf_counter()
                out[name] = fn()
                out[name]["bench_seconds"] = round(time.perf_counter() - t0, 1)
                log.info("bench %s done in %.0fs", name, out[name]["bench_seconds"])
        if "presets" in sections:
            out["presets"] = [bench_preset(Path(c), device, preset_steps, peak) for c in presets]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def flat(result: dict[str, Any]) -> dict[str, Any]:
    """`probe.exact_per_s`-style keys (what `--json` writes, besides the nested form)."""
    keys: dict[str, Any] = {"device": result["device"]}
    for section in ("probe", "scorer", "trainer", "overhead"):
        for k, v in result.get(section, {}).items():
            if isinstance(v, dict):
                keys.update({f"{section}.{k}.{k2}": v2 for k2, v2 in v.items()})
            else:
                keys[f"{section}.{k}"] = v
    for p in result.get("presets", []):
        for k, v in p.items():
            keys[f"presets.{p['name']}.{k}"] = v
    return keys


def table(result: dict[str, Any]) -> str:
    """The printed table."""
    rows = []
    p = result.get("probe")
    if p:
        rows += [
            ("probe", f"exact, reload per probe (ref {p['reference_size']})", f"{p['exact_reload_per_s']:.2f} probes/s", "baseline"),
            ("probe", "exact, in-memory snapshot", f"{p['exact_per_s']:.2f} probes/s", f"{p['exact_speedup_over_reload']:.1f}x reload"),
            ("probe", "first-order", f"{p['first_order_per_s']:.2f} probes/s",
             f"{p['first_order_speedup']:.1f}x exact; Spearman {p['first_order_spearman']:.3f}"),
        ]
    s = result.get("scorer")
    if s:
        for docs, label in ((s, "mixed lengths"), (s.get("at_cap"), "whole docs")):
            if not docs:
                continue
            rows += [
                ("scorer", f"naive ({s['docs']} docs, {s['encoder']}, {label}: "
                           f"{docs['tokens_mean']:.0f} tokens mean, {docs['at_window']:.0%} fill "
                           f"{s['max_tokens']})", f"{docs['naive_docs_per_s']:.1f} docs/s", "baseline"),
                ("scorer", f"bucketed, pre-tokenized ({s['precision']})", f"{docs['docs_per_s']:.1f} docs/s",
                 f"{docs['speedup']:.1f}x; max |diff| {docs['max_abs_diff']:.2e}"),
                ("scorer", "the same, compiled (MATES_SCORER_COMPILE=1)",
                 f"{docs['compiled_docs_per_s']:.1f} docs/s",
                 f"{docs['compiled_speedup']:.1f}x; max |diff| {docs['compiled_max_abs_diff']:.2e}"
                 + (f"; compile {s['compile_s']:.0f}s once" if docs is s else "")),
            ]
    t = result.get("trainer")
    if t:
        rows += [
            ("trainer", f"naive ({t['batch']}, fp32)", f"{t['naive_tokens_per_s']:.0f} tokens/s", "baseline"),
            ("trainer", f"Trainer ({t['precision']})", f"{t['tokens_per_s']:.0f} tokens/s", f"{t['speedup']:.1f}x"),
        ]
    o = result.get("overhead")
    if o:
        rows.append(("overhead", f"tiny run ({o['probing_method']} probes)",
                     f"{o['selection_fraction']:.1%} of training time",
                     f"train {o['training_s']:.1f}s, select {o['training_s'] * o['selection_fraction']:.1f}s"))
    for p in result.get("presets", []):
        mfu = "MFU n/a (no peak known)" if p["mfu"] is None else f"MFU {p['mfu']:.1%} of {p['peak_tflops']:g} TFLOP/s"
        rows.append(("preset", f"{p['name']} ({p['parameters'] / 1e6:.1f}M, {p['batch']}, {p['precision']})",
                     f"{p['tokens_per_s']:.0f} tokens/s", f"{p['achieved_tflops']:.1f} TFLOP/s; {mfu}"))
    w = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    m = result["machine"]
    head = f"device {result['device']} ({m['cpu']}), {m['threads']} threads, {result['date']}"
    if m.get("matmul_gflops"):
        head += (f"; matmul fp32 {m['matmul_gflops']['fp32']:.0f}, "
                 f"bf16 {m['matmul_gflops']['bf16']:.0f} GFLOP/s")
    lines = [head] + ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(lines)
