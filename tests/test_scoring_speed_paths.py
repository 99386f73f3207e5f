"""The fast scoring path agrees with the naive one, in order, in fp32 and in bf16."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from mates import lm
from mates.baselines import naive_predict
from mates.errors import ConfigError
from mates.influence import (
    MINILM_PACKAGE,
    InfluenceModel,
    InfluenceScorer,
    fast_predict,
    load_encoder,
    resolve_precision,
)

CPU = torch.device("cpu")
WORDS = "the market film council minister players award report shares fell rose season".split()


def mixed_texts(n: int, seed: int) -> list[str]:
    """Shuffled texts from empty to well past the tiny scorer's 32-token limit."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[0, 1, 60, 200], rng.integers(1, 50, size=n - 4)])
    texts = [" ".join(rng.choice(WORDS, size=int(k))) for k in lengths]
    return [texts[i] for i in rng.permutation(n)]


@pytest.fixture(scope="module")
def scorer() -> InfluenceScorer:
    encoder, tok = load_encoder("tiny", seed=0)
    return InfluenceScorer(InfluenceModel(encoder), tok, max_tokens=32, device=CPU)


@pytest.fixture
def at(scorer):
    """Set `scorer.precision` for one test, restoring it afterwards."""
    before = scorer.precision

    def set_precision(precision: str) -> InfluenceScorer:
        scorer.precision = precision
        return scorer

    yield set_precision
    scorer.precision = before


def test_fast_equals_naive_in_fp32(at):
    scorer, texts = at("fp32"), mixed_texts(40, seed=0)
    np.testing.assert_allclose(
        fast_predict(scorer, texts, 8), naive_predict(scorer, texts, 8), atol=1e-5, rtol=0
    )


def test_fast_in_bf16_is_within_1e_2_of_naive(at):
    scorer, texts = at("bf16"), mixed_texts(12, seed=1)  # few docs: bf16 may be emulated here
    assert scorer.resolved_precision() == "bf16"
    fast = fast_predict(scorer, texts, 4)
    np.testing.assert_allclose(fast, naive_predict(scorer, texts, 4), atol=1e-2, rtol=0)
    at("fp32")
    assert not np.array_equal(fast, fast_predict(scorer, texts, 4))  # bf16 really was used


def test_bf16_weight_copy_follows_changes_to_the_encoder():
    encoder, tok = load_encoder("tiny", seed=0)
    scorer = InfluenceScorer(
        InfluenceModel(encoder), tok, max_tokens=32, device=CPU, precision="bf16"
    )
    texts = mixed_texts(8, seed=4)
    before = fast_predict(scorer, texts, 4)
    assert scorer._inference_encoder("bf16") is scorer._inference_encoder("bf16")  # cached
    assert next(scorer._inference_encoder("bf16").parameters()).dtype == torch.bfloat16
    assert next(scorer.model.encoder.parameters()).dtype == torch.float32  # fitting stays fp32
    with torch.no_grad():  # what an optimizer step does: change weights in place
        for p in scorer.model.encoder.parameters():
            p.mul_(1.5)
    after = fast_predict(scorer, texts, 4)
    scorer.precision = "fp32"
    np.testing.assert_allclose(after, fast_predict(scorer, texts, 4), atol=1e-2, rtol=0)
    assert not np.allclose(before, after, atol=1e-2)


@pytest.mark.slow
def test_compiled_scoring_equals_the_naive_path_and_follows_weight_changes():
    encoder, tok = load_encoder("tiny", seed=0)
    scorer = InfluenceScorer(
        InfluenceModel(encoder), tok, max_tokens=32, device=CPU, precision="fp32", compile=True
    )
    texts = mixed_texts(40, seed=5)  # lengths 2..32 tokens: several batch shapes, one compile
    compiled = fast_predict(scorer, texts, 8)
    np.testing.assert_allclose(compiled, naive_predict(scorer, texts, 8), atol=1e-4, rtol=0)
    fn = scorer._compiled[1]
    fast_predict(scorer, texts[:7], 3)  # other batch sizes: the same compiled function
    assert scorer._compiled[1] is fn
    with torch.no_grad():  # frozen weights are constants: a change must compile again
        for p in scorer.model.encoder.parameters():
            p.mul_(1.5)
    np.testing.assert_allclose(
        fast_predict(scorer, texts, 8), naive_predict(scorer, texts, 8), atol=1e-4, rtol=0
    )
    assert scorer._compiled[1] is not fn
    scorer.precision = "bf16"
    np.testing.assert_allclose(
        fast_predict(scorer, texts, 8), naive_predict(scorer, texts, 8), atol=1e-2, rtol=0
    )


def test_output_order_is_input_order(at):
    scorer, texts = at("fp32"), mixed_texts(30, seed=2)
    base = fast_predict(scorer, texts, 4)
    perm = np.random.default_rng(3).permutation(len(texts))
    shuffled = [texts[i] for i in perm]
    np.testing.assert_allclose(fast_predict(scorer, shuffled, 4), base[perm], atol=1e-5, rtol=0)
    np.testing.assert_allclose(naive_predict(scorer, shuffled, 4), base[perm], atol=1e-5, rtol=0)


def test_naive_is_fp32_whatever_the_scorer_precision(at):
    texts = mixed_texts(6, seed=4)
    fp32 = naive_predict(at("fp32"), texts, 3)
    assert np.array_equal(naive_predict(at("bf16"), texts, 3), fp32)


def test_empty_input_gives_empty_scores(scorer):
    assert fast_predict(scorer, [], 4).shape == (0,)
    assert naive_predict(scorer, [], 4).shape == (0,)


def test_features_run_under_inference_mode(scorer):
    assert scorer.features(scorer.tokenize(["a short text"]), 2).is_inference()


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(lm, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(lm, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", CPU) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"


def test_training_autocast_follows_auto_precision(monkeypatch):
    """`train.precision: auto` (the default) trains in bf16 only where the CPU computes it."""
    from mates.config import TrainConfig

    assert TrainConfig().precision == "auto"
    monkeypatch.setattr(lm, "cpu_has_native_bf16", lambda: False)
    with lm.autocast(CPU, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(lm, "cpu_has_native_bf16", lambda: True)
    with lm.autocast(CPU, "auto"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with lm.autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def test_unknown_precision_is_refused(scorer):
    with pytest.raises(ConfigError, match="`precision` must be one of"):
        InfluenceScorer(scorer.model, scorer.tokenizer, 32, CPU, precision="fp16")
    with pytest.raises(ConfigError, match="'half'"):
        resolve_precision("half", CPU)


@pytest.mark.skipif(importlib.util.find_spec(MINILM_PACKAGE) is None, reason="MiniLM not installed")
def test_minilm_fast_equals_naive():
    encoder, tok = load_encoder("minilm")
    torch.manual_seed(0)
    scorer = InfluenceScorer(
        InfluenceModel(encoder), tok, max_tokens=64, device=CPU, precision="fp32"
    )
    texts = mixed_texts(20, seed=5)
    naive = naive_predict(scorer, texts, 8)
    np.testing.assert_allclose(fast_predict(scorer, texts, 8), naive, atol=1e-5, rtol=0)
    scorer.precision = "bf16"
    np.testing.assert_allclose(fast_predict(scorer, texts, 8), naive, atol=1e-2, rtol=0)


PIECES = [
    "market",
    "Minister",
    "shares",
    " ",
    " ",
    " ",
    "\t",
    "\n",
    "\x1c",
    "\u200b",
    "\u3000",
    "é",
    "e\u0301",
    "中文",
    "!",
    "--",
    "unbelievably",
    "x" * 120,
    "3.5%",
]


@pytest.mark.parametrize("max_tokens", [8, 32])
def test_tokenizing_from_a_head_gives_the_whole_texts_ids(scorer, max_tokens):
    """Heads cut at a space tokenize to the same ids, whether they reach the limit or not."""
    rng = np.random.default_rng(max_tokens)
    texts = ["".join(rng.choice(PIECES, size=int(rng.integers(0, 400)))) for _ in range(300)]
    texts += ["word " * 500, "x" * 150 + " " + "y" * 150 + " tail" * 100, "nospace" * 200]
    short = InfluenceScorer(scorer.model, scorer.tokenizer, max_tokens, CPU)
    plain = scorer.tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]
    assert short.tokenize(texts) == plain
