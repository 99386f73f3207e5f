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

One module per section (`probes`, `scoring`, `training`), over `common`; `driver` runs them.
"""

from mates.bench.common import FULL, QUICK, Sizes
from mates.bench.driver import cpu_name, flat, run_bench, table
from mates.bench.scoring import matmul_gflops, mixed_lengths
from mates.bench.training import peak_tflops, train_flops_per_token

__all__ = [
    "FULL",
    "QUICK",
    "Sizes",
    "cpu_name",
    "flat",
    "matmul_gflops",
    "mixed_lengths",
    "peak_tflops",
    "run_bench",
    "table",
    "train_flops_per_token",
]
