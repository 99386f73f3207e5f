"""The exact oracle: one AdamW step on one example, restored bit-exactly, never from disk."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from helpers import (
    TINY_MODEL,
    TINY_SEQ,
    TINY_VOCAB,
    random_tokens,
    synthetic_reference,
    tiny_train_config,
    warm_tiny_lm,
)

import mates.train
from mates.data.reference import IGNORE, ReferenceSet
from mates.lm import build_lm
from mates.probe import ExactOracle
from mates.train import make_optimizer

VOCAB, T = TINY_VOCAB, TINY_SEQ
PROBE_LR, CLIP = 2e-3, 1.0


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs a CUDA device (fused AdamW path)"
            ),
        ],
    ),
]


def _oracle(model, opt, ref) -> ExactOracle:
    return ExactOracle(
        model, opt, ref, lr=PROBE_LR, grad_clip=CLIP, precision="fp32", eval_batch_sequences=4
    )


def _full_state(model, opt) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "opt": {
            i: {k: v.clone() for k, v in opt.state[p].items()}
            for i, p in enumerate(model.parameters())
            if p in opt.state
        },
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
    }


def _assert_same_state(before: dict, model, opt) -> None:
    after = _full_state(model, opt)
    assert before["params"].keys() == after["params"].keys()
    for name, p in before["params"].items():
        assert torch.equal(p, after["params"][name]), f"parameter {name} changed"
    assert before["opt"].keys() == after["opt"].keys()
    for i, st in before["opt"].items():
        assert st.keys() == after["opt"][i].keys()
        for k, v in st.items():
            assert torch.equal(v, after["opt"][i][k]), f"optimizer state {k} of param {i} changed"
    assert before["groups"] == after["groups"]
    assert all(p.grad is None for p in model.parameters())


def _manual_ref_loss(model, ref: ReferenceSet) -> float:
    """Mean cross-entropy over scored tokens with full logits (independent of `lm_loss`)."""
    with torch.no_grad():
        logits = model(input_ids=ref.input_ids).logits.float()  # (N, T, V)
        return float(
            F.cross_entropy(logits.reshape(-1, VOCAB), ref.labels.reshape(-1), ignore_index=IGNORE)
        )


@pytest.mark.parametrize("device", DEVICES)
def test_restore_is_bit_exact_and_repeatable(device):
    model, opt = warm_tiny_lm(device=device)
    ref = synthetic_reference(6, 3)
    before = _full_state(model, opt)
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(next(iter(before["opt"].values())))
    oracle = _oracle(model, opt, ref)
    x = random_tokens(5)
    first = oracle.influence(x)
    _assert_same_state(before, model, opt)
    assert opt.param_groups[0]["lr"] == 7e-4  # the probe lr did not leak into training
    assert oracle.influence(x) == first
    other = oracle.influence(random_tokens(6))
    assert other != first
    _assert_same_state(before, model, opt)
    assert oracle.influence(x) == first  # still identical after another example


def test_influence_equals_an_independent_one_step_computation():
    model, opt = warm_tiny_lm()
    ref = synthetic_reference(6, 3)
    x = random_tokens(5)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    base = _manual_ref_loss(twin_model, ref)
    for group in twin_opt.param_groups:
        group["lr"] = PROBE_LR
    logits = twin_model(input_ids=x[None, :-1]).logits[0].float()  # (T, V)
    F.cross_entropy(logits, x[1:]).backward()
    torch.nn.utils.clip_grad_norm_(twin_model.parameters(), CLIP)
    twin_opt.step()
    expected = _manual_ref_loss(twin_model, ref) - base

    got = _oracle(model, opt, ref).influence(x)
    assert got == pytest.approx(expected, abs=1e-6)
    assert abs(expected) > 1e-4  # the step did move the reference loss


def test_base_loss_is_the_reference_loss_at_the_checkpoint():
    model, opt = warm_tiny_lm()
    ref = synthetic_reference(6, 3)
    assert _oracle(model, opt, ref).base_loss == pytest.approx(
        _manual_ref_loss(model, ref), abs=1e-6
    )


def test_training_on_the_reference_itself_is_helpful():
    """Lower is more helpful: a step on a reference sequence lowers the reference loss."""
    model, opt = warm_tiny_lm()
    ref = synthetic_reference(1, 8)
    helpful = torch.cat([ref.input_ids[0], ref.input_ids[0][:1]])
    oracle = _oracle(model, opt, ref)
    assert oracle.influence(helpful) < 0
    assert oracle.influence(helpful) < oracle.influence(random_tokens(5))


def test_snapshot_is_never_reloaded_from_disk(monkeypatch):
    model, opt = warm_tiny_lm()
    oracle = _oracle(model, opt, synthetic_reference(6, 3))
    expected = oracle.influence(random_tokens(5))

    def no_disk(*args, **kwargs):
        raise AssertionError("the oracle must restore from memory, not reload a checkpoint")

    for target, name in [
        (torch, "load"),
        (safetensors.torch, "load_file"),
        (safetensors.torch, "load"),
        (mates.train, "load_file"),
    ]:
        monkeypatch.setattr(target, name, no_disk)
    for _ in range(3):
        assert oracle.influence(random_tokens(5)) == expected


def test_fresh_optimizer_state_is_restored_to_empty():
    torch.manual_seed(0)
    model = build_lm(TINY_MODEL, VOCAB, T, eos_id=0)
    opt = make_optimizer(model, tiny_train_config(), torch.device("cpu"))
    params = [p.detach().clone() for p in model.parameters()]
    oracle = _oracle(model, opt, synthetic_reference(6, 3))
    first = oracle.influence(random_tokens(5))
    assert len(opt.state) == 0
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert oracle.influence(random_tokens(5)) == first


def test_restore_happens_even_when_the_step_fails(monkeypatch):
    model, opt = warm_tiny_lm()
    before = _full_state(model, opt)
    oracle = _oracle(model, opt, synthetic_reference(6, 3))

    def broken_ref_loss():
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(oracle, "_ref_loss", broken_ref_loss)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        oracle.influence(random_tokens(5))
    _assert_same_state(before, model, opt)


def test_too_short_example_is_rejected():
    model, opt = warm_tiny_lm(steps=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        _oracle(model, opt, synthetic_reference(6, 3)).influence(torch.tensor([3]))


@pytest.mark.parametrize("mode", [True, False])
def test_a_probe_leaves_the_model_in_the_mode_it_found_it(mode):
    """The probe's step trains; the model goes back to train or eval mode as it was."""
    model, opt = warm_tiny_lm()
    oracle = _oracle(model, opt, synthetic_reference(6, 3))
    model.train(mode)
    oracle.influence(random_tokens(5))
    assert all(m.training == mode for m in model.modules())
