"""The language model (GPT-NeoX, the Pythia architecture) and its losses."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mates.config import ModelConfig
from mates.data.reference import IGNORE, ReferenceSet
from mates.errors import ConfigError

# SDPA attention under a name transformers has no mask function for, so that it builds no
# mask at all and SDPA runs with is_causal=True. Under the name "sdpa", every forward
# without an attention mask checks the position ids for packed sequences, a `.all()` on
# a device tensor: one host-device sync per forward on a GPU, and, under torch.compile,
# a materialized (B, 1, T, T) mask that rules out the flash kernel. This model is only ever
# called without an attention mask (training sequences are packed, reference rows are
# right-padded and their padding is never scored), which is what makes that safe.
CAUSAL_SDPA = "mates_causal_sdpa"
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)


def build_lm(cfg: ModelConfig, vocab_size: int, seq_tokens: int, eos_id: int) -> GPTNeoXForCausalLM:
    """A randomly initialised GPT-NeoX from config (the paper pretrains from scratch), with
    `vocab_size` rounded up to `cfg.vocab_multiple` (the extra rows are never a target)."""
    hf_cfg = GPTNeoXConfig(
        vocab_size=-(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        max_position_embeddings=seq_tokens,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": cfg.rotary_pct,
        },
        initializer_range=cfg.init_std,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        attn_implementation=CAUSAL_SDPA,  # type: ignore[call-arg]  # a PreTrainedConfig kwarg; the typed signature omits it
    )
    return GPTNeoXForCausalLM(hf_cfg)


PRECISIONS = ("auto", "fp32", "bf16")
# CPU capability flags (torch.cpu.get_capabilities) meaning bf16 matmuls run in hardware;
# elsewhere bf16 autocast is emulated: measured on a 2-core AMD EPYC (Zen 3, AVX2, no
# AVX512) with the demo's LM, a training step took 3.2 s in bf16 against 0.19 s in fp32.
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512_BF16 or AMX on x86, BF16 on ARM)."""
    get = getattr(torch.cpu, "get_capabilities", None)  # absent in older torch
    caps = get() if get else {}
    return any(caps.get(flag) is True for flag in _CPU_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'fp32' or 'bf16': 'auto' is bf16 on CUDA with bf16 and on CPUs with native bf16."""
    if precision not in PRECISIONS:
        raise ConfigError(f"`precision` must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast where `precision` ('auto', 'fp32' or 'bf16') resolves to bf16 on
    `device` (`resolve_precision`); a no-op context in fp32."""
    if resolve_precision(precision, device) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lm_loss(
    model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy on the positions whose label is not IGNORE.

    `labels[:, t]` is the target for position t (already shifted). Only scored
    positions go through the output layer, which matters for LAMBADA-style sets
    where one or two tokens per sequence count.
    """
    logits, targets, _ = scored_logits(model, input_ids, labels)
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


def scored_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (M, V) and targets (M,) of the M scored positions, and the (B, T) mask of them."""
    hidden = model.base_model(input_ids=input_ids).last_hidden_state  # (B, T, C)
    mask = labels != IGNORE  # (B, T)
    return model.get_output_embeddings()(hidden[mask]), labels[mask], mask


def _batches(ref: ReferenceSet, batch_sequences: int, device: torch.device):
    """(first row, input ids, labels) per batch, trimmed to the batch's longest row
    (rows are length-sorted, so little padding is left)."""
    for start in range(0, len(ref), batch_sequences):
        end = min(start + batch_sequences, len(ref))
        width = int(ref.lengths[start:end].max())
        yield (
            start,
            ref.input_ids[start:end, :width].to(device, non_blocking=True),
            ref.labels[start:end, :width].to(device, non_blocking=True),
        )


@torch.no_grad()
def reference_loss(
    model: PreTrainedModel, ref: ReferenceSet, batch_sequences: int, precision: str = "fp32"
) -> float:
    """Mean loss over all scored tokens of a reference set, batched, no Python loop per example."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _, ids, labels in _batches(ref, batch_sequences, device):
        with autocast(device, precision):
            total += lm_loss(model, ids, labels, reduction="sum").double()
    model.train(was_training)
    return float(total) / ref.scored_tokens


@torch.no_grad()
def row_losses(
    model: PreTrainedModel, ref: ReferenceSet, batch_sequences: int, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a reference set: summed loss (float64), scored tokens, and whether every
    scored token is the model's top-1 prediction (a cloze row is then answered correctly)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(len(ref), dtype=torch.float64)
    counts = torch.zeros(len(ref), dtype=torch.long)
    correct = torch.zeros(len(ref), dtype=torch.long)
    for start, ids, labels in _batches(ref, batch_sequences, device):
        with autocast(device, precision):
            logits, targets, mask = scored_logits(model, ids, labels)
        logits = logits.float()  # (M, V)
        ce = F.cross_entropy(logits, targets, reduction="none").double().cpu()  # (M,)
        hit = (logits.argmax(-1) == targets).long().cpu()
        rows = mask.nonzero()[:, 0].cpu() + start  # (M,) the row of each scored token
        sums.index_add_(0, rows, ce)
        counts.index_add_(0, rows, torch.ones_like(rows))
        correct.index_add_(0, rows, hit)
    model.train(was_training)
    return sums, counts, correct == counts
