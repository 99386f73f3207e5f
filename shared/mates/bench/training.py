"""Training: the optimized trainer against the naive loop, and the presets' tokens/s and MFU."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from mates.bench.common import Sizes, sync, trained
from mates.config import load_config
from mates.data.packing import PackedStream
from mates.lm import resolve_precision
from mates.run import Run, resolve_device

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- trainer


def bench_trainer(run: Run, sizes: Sizes) -> dict[str, Any]:
    from mates.baselines import NaiveTrainer

    cfg = run.cfg
    tc = cfg.train
    ids = np.random.default_rng([cfg.seed, 6]).permutation(len(run.corpus))[:2000]
    fast, _ = trained(run, steps=0)
    naive = NaiveTrainer.for_run(run)
    s_fast = PackedStream(run.corpus, ids, tc.seq_tokens, run.eos, seed=1)
    s_naive = PackedStream(run.corpus, ids, tc.seq_tokens, run.eos, seed=1)
    for tr, st in ((fast, s_fast), (naive, s_naive)):  # warm-up
        tr.train_step(st)
    sync(run.device)
    t_fast = t_naive = 0.0
    per = max(1, sizes.trainer_steps // sizes.rounds)
    steps = 0
    for _ in range(sizes.rounds):
        t0 = time.perf_counter()
        for _ in range(per):
            naive.train_step(s_naive)
        sync(run.device)
        t_naive += time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(per):
            loss = fast.train_step(s_fast)  # a device tensor: no sync inside the step
        float(loss)  # the host waits for the last step, as a read-back would
        sync(run.device)
        t_fast += time.perf_counter() - t0
        steps += per
    tokens = steps * tc.batch_sequences * tc.seq_tokens
    return {
        "precision": resolve_precision(tc.precision, run.device),
        "batch": f"{tc.batch_sequences}x{tc.seq_tokens}",
        "parameters": sum(p.numel() for p in fast.model.parameters()),
        "steps": steps,
        "naive_tokens_per_s": tokens / t_naive,
        "tokens_per_s": tokens / t_fast,
        "speedup": t_naive / t_fast,
    }


# --------------------------------------------------------------------------- presets (MFU)

# Dense bf16 peak of one GPU, TFLOP/s (vendor datasheets, without sparsity), matched
# against torch.cuda.get_device_name in this order; --peak-tflops overrides it.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
PRESET_VOCAB = (
    50277  # Pythia's tokenizer, for presets whose tokenizer is not here (the preset pads it)
)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def train_flops_per_token(
    model: PreTrainedModel, num_layers: int, hidden_size: int, seq_tokens: int
) -> float:
    """Model FLOPs of one training token: 6·N + 12·L·d·T (PaLM, Chowdhery et al. 2022, app. B).

    N counts the parameters that do matmuls: all but the input embedding, which is a
    lookup (Pythia's output embedding is untied, and is counted).
    """
    emb = model.get_input_embeddings().weight.numel()  # type: ignore[operator]  # a Module's attribute, typed loosely
    n = sum(p.numel() for p in model.parameters()) - emb
    return 6.0 * n + 12.0 * num_layers * hidden_size * seq_tokens


class RandomTokens:
    """A stream of uniformly random token batches (throughput does not depend on the text)."""

    def __init__(self, vocab_size: int, seq_tokens: int, seed: int = 0):
        self.vocab_size, self.seq_tokens = vocab_size, seq_tokens
        self.gen = torch.Generator().manual_seed(seed)

    def next_block(self, n_sequences: int) -> torch.Tensor:
        return torch.randint(
            0, self.vocab_size, (n_sequences, self.seq_tokens + 1), generator=self.gen
        )


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
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = trainer.train_step(stream)
    float(loss)
    sync(dev)
    seconds = time.perf_counter() - t0
    tokens_per_s = steps * tc.batch_sequences * tc.seq_tokens / seconds
    flops = train_flops_per_token(trainer.model, mc.num_layers, mc.hidden_size, tc.seq_tokens)
    peak = peak if peak is not None else peak_tflops(dev)
    out = {
        "config": str(config),
        "name": cfg.name,
        "device": str(dev),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "batch": f"{tc.batch_sequences}x{tc.seq_tokens}",
        "micro_batch": tc.micro_batch_sequences,
        "precision": resolve_precision(tc.precision, dev),
        "compile": tc.compile,
        "steps": steps,
        "seconds_per_step": seconds / steps,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "achieved_tflops": tokens_per_s * flops / 1e12,
        "peak_tflops": peak,
        "mfu": None if not peak else tokens_per_s * flops / (peak * 1e12),
    }
    if dev.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out
