"""First-order probes: AdamW's update computed elementwise, dotted with ∇L_ref."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, tiny_train_config

from mates.data.reference import IGNORE, ReferenceSet
from mates.lm import build_lm, lm_loss, reference_loss
from mates.probe import ExactOracle, FirstOrderOracle
from mates.stats import spearman
from mates.train import make_optimizer

VOCAB, T = 64, 16
CLIP = 1.0
FP32_EPS = 2.0**-23


def _reference(n: int = 8, scored: int = 8, seed: int = 0) -> ReferenceSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    labels = torch.full((n, T), IGNORE, dtype=torch.long)
    labels[:, T - scored - 1 : T - 1] = ids[:, T - scored :]
    return ReferenceSet(ids, labels, torch.full((n,), T), "synthetic")


def _model_and_warm_optimizer(steps: int = 3, device: str = "cpu"):
    """A tiny GPT-NeoX whose AdamW already has moments and step counts (a real checkpoint)."""
    torch.manual_seed(0)
    model = build_lm(TINY_MODEL, VOCAB, T, eos_id=0).to(device)
    opt = make_optimizer(model, tiny_train_config(weight_decay=0.1), torch.device(device))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        block = torch.randint(1, VOCAB, (4, T + 1), generator=g).to(device)
        lm_loss(model, block[:, :-1], block[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for group in opt.param_groups:
        group["lr"] = 7e-4  # the train lr at this checkpoint; the probe uses its own
    return model, opt


def _tokens(seed: int, length: int = T + 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def _mixed_documents(ref: ReferenceSet) -> list[torch.Tensor]:
    """Twelve probes of different kinds: random, copies of reference rows, degenerate, short."""
    docs = [_tokens(seed) for seed in range(6)]
    docs += [torch.cat([ref.input_ids[i], ref.input_ids[i][:1]]) for i in range(3)]  # helpful
    docs += [torch.full((T + 1,), 7), torch.tensor([3, 4, 5] * 3), _tokens(9, length=6)]
    return docs


def _first_order(model, opt, ref, lr: float, clip: float = CLIP, **kw) -> FirstOrderOracle:
    return FirstOrderOracle(model, opt, ref, lr=lr, grad_clip=clip, precision="fp32",
                            eval_batch_sequences=3, **kw)


def _real_step_delta(model, opt, x: torch.Tensor, lr: float, clip: float) -> list[torch.Tensor]:
    """θ_after − θ_before of a real AdamW step on x (on a deep copy), and θ_after."""
    twin_model, twin_opt = copy.deepcopy((model, opt))
    for group in twin_opt.param_groups:
        group["lr"] = lr
    lm_loss(twin_model, x[None, :-1].to(x.device), x[None, 1:]).backward()
    torch.nn.utils.clip_grad_norm_(twin_model.parameters(), clip)
    twin_opt.step()
    return [(after.detach() - before.detach(), after.detach()) for before, after
            in zip(model.parameters(), twin_model.parameters(), strict=True)]


def _assert_same_update(got: list[torch.Tensor], real: list) -> None:
    """Equal to 1e-6 relative, beyond the rounding of θ_after itself (about one ulp of θ)."""
    for mine, (delta, after) in zip(got, real, strict=True):
        bound = 1e-6 * delta.abs() + 2 * FP32_EPS * after.abs()
        assert bool(((mine - delta).abs() <= bound).all()), float((mine - delta).abs().max())
        assert float((mine - delta).norm() / delta.norm()) < 1e-4


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (fused AdamW path)")]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("steps", [3, 0], ids=["warm-state", "no-state"])
@pytest.mark.parametrize("clip", [CLIP, 1e3], ids=["clipped", "unclipped"])
def test_elementwise_update_equals_a_real_adamw_step(device, steps, clip):
    model, opt = _model_and_warm_optimizer(steps=steps, device=device)
    x, lr = _tokens(5).to(device), 2e-3
    oracle = _first_order(model, opt, _reference().to(torch.device(device)), lr, clip=clip)
    got = [d.clone() for d in oracle.step_delta(x)]
    _assert_same_update(got, _real_step_delta(model, opt, x, lr, clip))
    assert oracle.clipped == int(clip == CLIP)  # this document's gradient norm is above 1
    # a second document reuses the buffers and still gets its own update
    y = _tokens(6).to(device)
    _assert_same_update(oracle.step_delta(y), _real_step_delta(model, opt, y, lr, clip))


@pytest.mark.parametrize("shift", [False, True], ids=["at-theta", "shifted"])
def test_first_order_agrees_with_the_exact_oracle_at_a_small_lr(shift):
    # 1e-4: small enough that the curvature term is negligible, large enough that the exact
    # oracle's reference-loss difference stands well above fp32 rounding (at 1e-5 it does not)
    model, opt = _model_and_warm_optimizer()
    ref, lr = _reference(), 1e-4
    docs = _mixed_documents(ref)
    exact = ExactOracle(model, opt, ref, lr=lr, grad_clip=CLIP, precision="fp32",
                        eval_batch_sequences=3)
    expected = np.array([exact.influence(x) for x in docs])
    got = _first_order(model, opt, ref, lr, shift=shift).influences(docs)
    assert (expected < 0).any() and (expected > 0).any()  # the kinds really differ
    np.testing.assert_allclose(got, expected, rtol=0.05)
    assert spearman(got, expected) >= 0.9


def test_shifting_absorbs_the_momentum_part_of_a_large_step():
    """At a train-sized lr the shared part of the step (momentum, decay) dominates; linearising
    after it leaves a smaller error than linearising at θ."""
    model, opt = _model_and_warm_optimizer()
    ref, lr = _reference(), 1e-3
    docs = _mixed_documents(ref)
    exact = ExactOracle(model, opt, ref, lr=lr, grad_clip=CLIP, precision="fp32",
                        eval_batch_sequences=3)
    expected = np.array([exact.influence(x) for x in docs])
    err = {shift: np.median(np.abs(_first_order(model, opt, ref, lr, shift=shift)
                                   .influences(docs) / expected - 1))
           for shift in (False, True)}
    assert err[True] < err[False] / 2


def _full_state(model, opt) -> dict:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "opt": [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
    }


def _assert_same_state(before: dict, model, opt) -> None:
    after = _full_state(model, opt)
    for a, b in zip(before["params"], after["params"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(before["opt"], after["opt"], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert before["groups"] == after["groups"]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("shift", [False, True], ids=["at-theta", "shifted"])
@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_model_and_optimizer_are_left_bit_exactly_unchanged(shift, training):
    model, opt = _model_and_warm_optimizer()
    model.train(training)
    ref = _reference()
    before = _full_state(model, opt)
    oracle = _first_order(model, opt, ref, 2e-3, shift=shift)
    _assert_same_state(before, model, opt)
    assert model.training is training
    oracle.influences([_tokens(5), _tokens(6)])
    _assert_same_state(before, model, opt)
    assert model.training is training
    assert oracle.base_loss == reference_loss(model, ref, 3)


@pytest.mark.parametrize("shift", [False, True], ids=["at-theta", "shifted"])
def test_influences_of_a_list_equal_one_at_a_time(shift):
    model, opt = _model_and_warm_optimizer()
    ref = _reference()
    docs = _mixed_documents(ref)
    oracle = _first_order(model, opt, ref, 2e-3, shift=shift)
    many = oracle.influences(docs)
    assert many.dtype == np.float64 and many.shape == (len(docs),)
    assert many.tolist() == [oracle.influence(x) for x in docs]
    assert oracle.clipped == 2 * sum(int(_grad_norm(model, x) > CLIP) for x in docs)


def _grad_norm(model, x: torch.Tensor) -> float:
    twin = copy.deepcopy(model)
    lm_loss(twin, x[None, :-1], x[None, 1:]).backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()]))


def test_reference_gradient_is_batch_size_independent():
    model, opt = _model_and_warm_optimizer()
    ref, x = _reference(n=7), _tokens(5)
    one = FirstOrderOracle(model, opt, ref, lr=2e-3, grad_clip=CLIP, precision="fp32",
                           eval_batch_sequences=7).influence(x)
    chunked = FirstOrderOracle(model, opt, ref, lr=2e-3, grad_clip=CLIP, precision="fp32",
                               eval_batch_sequences=2).influence(x)
    assert chunked == pytest.approx(one, rel=1e-5)


def test_too_short_example_is_rejected():
    model, opt = _model_and_warm_optimizer(steps=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        _first_order(model, opt, _reference(), 2e-3).influence(torch.tensor([3]))


def test_bf16_autocast_probes_rank_like_the_fp32_exact_oracle():
    model, opt = _model_and_warm_optimizer()
    ref, lr = _reference(), 1e-3
    docs = _mixed_documents(ref)
    exact = ExactOracle(model, opt, ref, lr=lr, grad_clip=CLIP, precision="fp32",
                        eval_batch_sequences=3)
    expected = np.array([exact.influence(x) for x in docs])
    before = _full_state(model, opt)
    oracle = FirstOrderOracle(model, opt, ref, lr=lr, grad_clip=CLIP, precision="bf16",
                              eval_batch_sequences=3, shift=True)
    assert spearman(oracle.influences(docs), expected) >= 0.9
    _assert_same_state(before, model, opt)
