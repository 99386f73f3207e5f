"""First-order probes: AdamW's update computed elementwise, dotted with ∇L_ref."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import TINY_SEQ, TINY_VOCAB, random_tokens, synthetic_reference, warm_tiny_lm

from mates.data.reference import ReferenceSet
from mates.lm import lm_loss, reference_loss
from mates.probe import ExactOracle, FirstOrderOracle, _views
from mates.stats import spearman

VOCAB, T = TINY_VOCAB, TINY_SEQ
CLIP = 1.0
FP32_EPS = 2.0**-23


def _mixed_documents(ref: ReferenceSet) -> list[torch.Tensor]:
    """Twelve probes of different kinds: random, copies of reference rows, degenerate, short."""
    docs = [random_tokens(seed) for seed in range(6)]
    docs += [torch.cat([ref.input_ids[i], ref.input_ids[i][:1]]) for i in range(3)]  # helpful
    docs += [torch.full((T + 1,), 7), torch.tensor([3, 4, 5] * 3), random_tokens(9, length=6)]
    return docs


def _exact_on_mixed_documents(lr: float):
    """A warm tiny LM, the reference, the twelve mixed probes and their exact influences."""
    model, opt = warm_tiny_lm()
    ref = synthetic_reference(8, 8)
    docs = _mixed_documents(ref)
    exact = ExactOracle(
        model, opt, ref, lr=lr, grad_clip=CLIP, precision="fp32", eval_batch_sequences=3
    )
    return model, opt, ref, docs, np.array([exact.influence(x) for x in docs])


def _first_order(model, opt, ref, lr: float, clip: float = CLIP, **kw) -> FirstOrderOracle:
    return FirstOrderOracle(
        model, opt, ref, lr=lr, grad_clip=clip, precision="fp32", eval_batch_sequences=3, **kw
    )


def _real_step_delta(model, opt, x: torch.Tensor, lr: float, clip: float) -> list[tuple]:
    """A real AdamW step on x (on a deep copy): per parameter θ_after − θ_before, θ_after and
    the size of the update's own terms, |lr/bc1|·(β1|m| + (1−β1)|g|)/den (what `_bound` needs)."""
    twin_model, twin_opt = copy.deepcopy((model, opt))
    for group in twin_opt.param_groups:
        group["lr"] = lr
    lm_loss(twin_model, x[None, :-1].to(x.device), x[None, 1:]).backward()
    torch.nn.utils.clip_grad_norm_(twin_model.parameters(), clip)
    terms = {}
    for group in twin_opt.param_groups:
        (b1, b2), eps = group["betas"], group["eps"]
        for p in group["params"]:
            state = twin_opt.state.get(p, {})
            m = state.get("exp_avg", torch.zeros_like(p))
            v = state.get("exp_avg_sq", torch.zeros_like(p))
            step = int(state["step"]) + 1 if "step" in state else 1
            g = p.grad
            den = (b2 * v + (1 - b2) * g * g).sqrt() / (1 - b2**step) ** 0.5 + eps
            terms[p] = lr / (1 - b1**step) * (b1 * m.abs() + (1 - b1) * g.abs()) / den
    twin_opt.step()
    return [
        (after.detach() - before.detach(), after.detach(), terms[after])
        for before, after in zip(model.parameters(), twin_model.parameters(), strict=True)
    ]


def _assert_same_update(got: list[torch.Tensor], real: list) -> None:
    """Equal up to fp32 rounding: one ulp of θ_after, which the real step's difference carries,
    plus a few ulps of the update's own terms. The second matters where m' = β1·m + (1−β1)·g
    nearly cancels: there the two implementations' roundings (torch's foreach order on CPU,
    the fused kernel's on CUDA) differ by far more than 1e-6 of the small result."""
    for mine, (delta, after, term) in zip(got, real, strict=True):
        bound = 1e-6 * delta.abs() + 2 * FP32_EPS * after.abs() + 8 * FP32_EPS * term
        err = (mine - delta).abs()
        assert bool((err <= bound).all()), (
            f"{float((err / bound).nan_to_num(0.0).max()):.3g}x the rounding bound"
        )
        assert float((mine - delta).norm() / delta.norm()) < 1e-4


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("steps", [3, 0], ids=["warm-state", "no-state"])
@pytest.mark.parametrize("clip", [CLIP, 1e3], ids=["clipped", "unclipped"])
def test_elementwise_update_equals_a_real_adamw_step(device, steps, clip):
    model, opt = warm_tiny_lm(steps=steps, device=device)
    x, lr = random_tokens(5).to(device), 2e-3
    oracle = _first_order(
        model, opt, synthetic_reference(8, 8).to(torch.device(device)), lr, clip=clip
    )
    got = [d.clone() for d in oracle.step_delta(x)]
    _assert_same_update(got, _real_step_delta(model, opt, x, lr, clip))
    assert oracle.clipped == int(clip == CLIP)  # this document's gradient norm is above 1
    # a second document reuses the buffers and still gets its own update
    y = random_tokens(6).to(device)
    _assert_same_update(oracle.step_delta(y), _real_step_delta(model, opt, y, lr, clip))


@pytest.mark.parametrize("shift", [False, True], ids=["at-theta", "shifted"])
def test_first_order_agrees_with_the_exact_oracle_at_a_small_lr(shift):
    # 1e-4: small enough that the curvature term is negligible, large enough that the exact
    # oracle's reference-loss difference stands well above fp32 rounding (at 1e-5 it does not)
    lr = 1e-4
    model, opt, ref, docs, expected = _exact_on_mixed_documents(lr)
    got = _first_order(model, opt, ref, lr, shift=shift).influences(docs)
    assert (expected < 0).any() and (expected > 0).any()  # the kinds really differ
    np.testing.assert_allclose(got, expected, rtol=0.05)
    assert spearman(got, expected) >= 0.9


def test_shifting_absorbs_the_momentum_part_of_a_large_step():
    """At a train-sized lr the shared part of the step (momentum, decay) dominates; linearising
    after it leaves a smaller error than linearising at θ."""
    lr = 1e-3
    model, opt, ref, docs, expected = _exact_on_mixed_documents(lr)
    err = {
        shift: np.median(
            np.abs(_first_order(model, opt, ref, lr, shift=shift).influences(docs) / expected - 1)
        )
        for shift in (False, True)
    }
    assert err[True] < err[False] / 2


@pytest.mark.parametrize("shift", [False, True], ids=["at-theta", "shifted"])
def test_the_shared_step_effect_matches_a_zero_gradient_adamw_step(shift):
    """The part of every probe's step that is the same for all documents (momentum, decay):
    the first-order oracle's estimate agrees with the exact oracle's zero-gradient step, and
    neither leaves the model or optimizer changed."""
    lr = 1e-4
    model, opt = warm_tiny_lm()
    ref = synthetic_reference(8, 8)
    before = _full_state(model, opt)
    exact = ExactOracle(
        model, opt, ref, lr=lr, grad_clip=CLIP, precision="fp32", eval_batch_sequences=3
    ).shared_effect()
    got = _first_order(model, opt, ref, lr, shift=shift).shared_effect()
    assert exact != 0.0
    assert got == pytest.approx(exact, rel=0.05)
    _assert_same_state(before, model, opt)


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
    model, opt = warm_tiny_lm()
    model.train(training)
    ref = synthetic_reference(8, 8)
    before = _full_state(model, opt)
    oracle = _first_order(model, opt, ref, 2e-3, shift=shift)
    _assert_same_state(before, model, opt)
    assert model.training is training
    oracle.influences([random_tokens(5), random_tokens(6)])
    _assert_same_state(before, model, opt)
    assert model.training is training
    assert oracle.base_loss == reference_loss(model, ref, 3)


@pytest.mark.parametrize("shift", [False, True], ids=["at-theta", "shifted"])
def test_influences_of_a_list_equal_one_at_a_time(shift):
    model, opt = warm_tiny_lm()
    ref = synthetic_reference(8, 8)
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
    model, opt = warm_tiny_lm()
    ref, x = synthetic_reference(7, 8), random_tokens(5)
    one = FirstOrderOracle(
        model, opt, ref, lr=2e-3, grad_clip=CLIP, precision="fp32", eval_batch_sequences=7
    ).influence(x)
    chunked = FirstOrderOracle(
        model, opt, ref, lr=2e-3, grad_clip=CLIP, precision="fp32", eval_batch_sequences=2
    ).influence(x)
    assert chunked == pytest.approx(one, rel=1e-5)


def test_too_short_example_is_rejected():
    model, opt = warm_tiny_lm(steps=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        _first_order(model, opt, synthetic_reference(8, 8), 2e-3).influence(torch.tensor([3]))


def test_bf16_autocast_probes_rank_like_the_fp32_exact_oracle():
    lr = 1e-3
    model, opt, ref, docs, expected = _exact_on_mixed_documents(lr)
    before = _full_state(model, opt)
    oracle = FirstOrderOracle(
        model, opt, ref, lr=lr, grad_clip=CLIP, precision="bf16", eval_batch_sequences=3, shift=True
    )
    assert spearman(oracle.influences(docs), expected) >= 0.9
    _assert_same_state(before, model, opt)


def _adamw_update64(m, v, g, *, lr, beta1, beta2, eps, wd, theta, step):
    """AdamW's Δθ for gradient g from state (m, v), in float64, written out independently."""
    m2 = beta1 * m + (1 - beta1) * g
    v2 = beta2 * v + (1 - beta2) * g * g
    den = (v2 / (1 - beta2**step)).sqrt() + eps
    return -lr / (1 - beta1**step) * m2 / den - lr * wd * theta


def test_batch_probe_is_the_adamw_jacobian_at_the_momentum():
    """`batch=True`: J·g_x equals the central difference of AdamW's update around g = m in
    float64, and the influence is ⟨∇L_ref, J·g_x⟩, with no per-document clipping."""
    model, opt = warm_tiny_lm(steps=3)
    lr = 2e-3
    ref = synthetic_reference(8, 8)
    oracle = _first_order(model, opt, ref, lr, batch=True)
    x = random_tokens(5)
    got = [d.clone() for d in oracle.step_delta(x)]
    assert oracle.clipped == 0
    g_x = [g.double() for g in oracle._clipped_grads(x, clip=False)[0]]
    group = opt.param_groups[0]
    (b1, b2), eps = group["betas"], group["eps"]
    h = 1e-6  # small enough to stay linear where m and v are tiny and g_x is not
    for p, mine, gx in zip(model.parameters(), got, g_x, strict=True):
        st = opt.state[p]
        m, v, step = st["exp_avg"].double(), st["exp_avg_sq"].double(), int(st["step"]) + 1
        wd = next(
            gr["weight_decay"] for gr in opt.param_groups if any(q is p for q in gr["params"])
        )
        kw = dict(lr=lr, beta1=b1, beta2=b2, eps=eps, wd=wd, theta=p.detach().double(), step=step)
        fd = (_adamw_update64(m, v, m + h * gx, **kw) - _adamw_update64(m, v, m - h * gx, **kw)) / (
            2 * h
        )
        assert float((mine.double() - fd).norm()) <= 1e-4 * float(fd.norm()) + 1e-12
    expected = sum(
        float((r * d).sum())
        for r, d in zip(_views(oracle._grad_ref, oracle._params), got, strict=True)
    )
    assert oracle.influence(x) == pytest.approx(expected, rel=1e-5)


def test_batch_and_shift_do_not_combine():
    model, opt = warm_tiny_lm(steps=1)
    with pytest.raises(ValueError, match="not both"):
        _first_order(model, opt, synthetic_reference(8, 8), 1e-3, shift=True, batch=True)
