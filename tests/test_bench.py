"""`mates bench` plumbing: the figures' keys, the table, bad arguments. (Speed is measured by
running the bench, never asserted in a test.)"""

from __future__ import annotations

import pytest

from mates.bench import flat, run_bench, table
from mates.cli import main

REQUIRED = [
    "probe.exact_reload_per_s",
    "probe.exact_per_s",
    "probe.first_order_per_s",
    "probe.first_order_speedup",
    "probe.first_order_spearman",
    "probe.reference_size",
    "scorer.naive_docs_per_s",
    "scorer.docs_per_s",
    "scorer.speedup",
    "scorer.max_abs_diff",
    "trainer.naive_tokens_per_s",
    "trainer.tokens_per_s",
    "trainer.speedup",
    "overhead.selection_fraction",
    "device",
]


def _result() -> dict:
    return {
        "device": "cpu",
        "quick": True,
        "date": "2026-11-24 00:00 UTC",
        "machine": {
            "cpu": "AMD EPYC",
            "threads": 2,
            "torch": "2.13.0",
            "gpu": None,
            "matmul_gflops": {"fp32": 180.0, "bf16": 415.0},
        },
        "probe": {
            "reference_size": 256,
            "probes": 16,
            "lr": 1e-4,
            "exact_reload_per_s": 0.2,
            "exact_per_s": 0.8,
            "first_order_per_s": 12.0,
            "first_order_spearman": 0.95,
            "first_order_speedup": 15.0,
            "exact_speedup_over_reload": 4.0,
        },
        "scorer": {
            "docs": 600,
            "encoder": "minilm",
            "max_tokens": 128,
            "batch_size": 64,
            "precision": "bf16",
            "set": "mixed lengths (paragraph cuts)",
            "tokens_mean": 90.0,
            "tokens_p10_p50_p90": [12, 128, 128],
            "at_window": 0.6,
            "naive_docs_per_s": 70.0,
            "docs_per_s": 220.0,
            "speedup": 3.1,
            "max_abs_diff": 1e-3,
            "compiled_docs_per_s": 250.0,
            "compiled_speedup": 3.6,
            "compiled_max_abs_diff": 2e-3,
            "compile_s": 12.0,
            "at_cap": {
                "set": "whole documents",
                "tokens_mean": 126.0,
                "tokens_p10_p50_p90": [128, 128, 128],
                "at_window": 0.96,
                "naive_docs_per_s": 50.0,
                "docs_per_s": 110.0,
                "speedup": 2.2,
                "max_abs_diff": 2e-3,
                "compiled_docs_per_s": 120.0,
                "compiled_speedup": 2.4,
                "compiled_max_abs_diff": 2e-3,
            },
        },
        "trainer": {
            "precision": "bf16",
            "batch": "16x256",
            "parameters": 7_350_000,
            "steps": 6,
            "naive_tokens_per_s": 2000.0,
            "tokens_per_s": 5000.0,
            "speedup": 2.5,
        },
        "overhead": {
            "config": "configs/tiny.yaml",
            "probing_method": "exact",
            "training_s": 2.0,
            "probing_s": 0.5,
            "fitting_s": 0.3,
            "scoring_s": 0.1,
            "selecting_s": 0.01,
            "selection_fraction": 0.455,
        },
    }


def test_flat_has_every_key_the_issue_names():
    keys = flat(_result())
    assert set(REQUIRED) <= set(keys)
    assert keys["probe.first_order_speedup"] == 15.0
    assert keys["scorer.at_cap.speedup"] == 2.2  # the whole-documents set, nested keys flattened


def test_table_names_every_arm():
    text = table(_result())
    for needle in (
        "reload per probe",
        "in-memory",
        "first-order",
        "Spearman 0.950",
        "naive",
        "3.1x",
        "compiled",
        "3.6x",
        "compile 12s once",
        "tokens/s",
        "45.5% of training time",
        "mixed lengths: 90 tokens mean, 60% fill 128",
        "whole docs: 126 tokens mean",
        "2.2x",
        "AMD EPYC",
        "bf16 415 GFLOP/s",
    ):
        assert needle in text, needle


def test_the_mixed_length_set_cuts_each_document_at_a_paragraph_boundary():
    from mates.bench import mixed_lengths

    texts = [
        f"title {i}\n\n" + "\n\n".join(f"paragraph {j} of {i}" for j in range(8))
        for i in range(200)
    ] + ["one paragraph only"]
    cut = mixed_lengths(texts, seed=0)
    assert cut == mixed_lengths(texts, seed=0)
    assert cut[-1] == "one paragraph only"
    kept = []
    for whole, part in zip(texts, cut, strict=True):
        assert whole.startswith(part) and (part == whole or whole[len(part) :].startswith("\n\n"))
        kept.append(part.count("\n\n") + 1)
    assert min(kept) == 1 and max(kept) == 9  # from the title alone to the whole document
    assert 4 < sum(kept) / len(kept) < 6  # uniform over 1..9


def test_only_accepts_known_sections(capsys):
    assert main(["bench", "--only", "probe,warp"]) == 2
    assert "unknown section" in capsys.readouterr().err


@pytest.mark.slow
def test_overhead_section_runs_a_tiny_run():
    out = run_bench(quick=True, sections=("overhead",))
    o = out["overhead"]
    assert o["training_s"] > 0 and o["probing_s"] > 0 and o["fitting_s"] > 0
    assert o["selection_fraction"] == pytest.approx(
        (o["probing_s"] + o["fitting_s"] + o["scoring_s"] + o["selecting_s"]) / o["training_s"]
    )
    assert "probe" not in out and out["device"] == "cpu"


def test_train_flops_per_token_counts_matmul_parameters_and_attention():
    from mates.bench import train_flops_per_token
    from mates.config import ModelConfig
    from mates.lm import build_lm

    model = build_lm(ModelConfig(hidden_size=32, num_layers=2, num_heads=2), 100, 16, eos_id=0)
    total = sum(p.numel() for p in model.parameters())
    n = total - 100 * 32  # the input embedding is a lookup, not a matmul
    assert train_flops_per_token(model, 2, 32, 16) == 6 * n + 12 * 2 * 32 * 16


def test_peak_is_known_for_gpus_by_name_only(monkeypatch):
    import torch

    from mates import bench

    assert bench.peak_tflops(torch.device("cpu")) is None
    for name, peak in (
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", None),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None, n=name: n)
        assert bench.peak_tflops(torch.device("cuda")) == peak, name


def test_preset_section_reports_tokens_per_s_and_mfu(tmp_path, capsys):
    out = tmp_path / "presets.json"
    assert (
        main(
            [
                "bench",
                "--only",
                "presets",
                "--preset",
                "configs/tiny.yaml",
                "--preset-steps",
                "2",
                "--peak-tflops",
                "2.5",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    import json

    keys = json.loads(out.read_text())
    p = keys["nested"]["presets"][0]
    assert p["name"] == "tiny" and p["steps"] == 2 and p["tokens_per_s"] > 0
    assert p["achieved_tflops"] == pytest.approx(p["tokens_per_s"] * p["flops_per_token"] / 1e12)
    assert p["mfu"] == pytest.approx(p["achieved_tflops"] / 2.5)
    assert keys["presets.tiny.mfu"] == p["mfu"]
    assert "MFU" in capsys.readouterr().out
    assert main(["bench", "--only", "presets"]) == 2
    assert "needs at least one --preset" in capsys.readouterr().err
