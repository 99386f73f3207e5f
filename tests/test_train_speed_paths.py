"""The fast training paths keep the step's math: naive vs optimized, deferred read-back, compile."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, FakeCorpus, random_docs, tiny_train_config

from mates.baselines import NaiveTrainer
from mates.data.packing import PackedStream
from mates.errors import StageFailed
from mates.lm import CAUSAL_SDPA, build_lm
from mates.train import Callback, Trainer

VOCAB, T = 64, 16
CPU = torch.device("cpu")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_lm(TINY_MODEL, VOCAB, T, eos_id=0)


def _stream() -> PackedStream:
    docs = random_docs(30, VOCAB, seed=1)
    return PackedStream(FakeCorpus(docs), np.arange(len(docs)), T, eos_id=0, seed=0)


class Recorder(Callback):
    def __init__(self):
        self.infos = []

    def step_end(self, trainer, info):
        self.infos.append(info)


def test_optimized_and_naive_trainers_follow_the_same_loss_trajectory():
    model = _model()
    cfg = tiny_train_config(lr=3e-3, micro_batch_sequences=2)
    fast, naive = Trainer(copy.deepcopy(model), cfg, CPU), NaiveTrainer(model, cfg, CPU)
    assert naive.model.config._attn_implementation == "eager"
    assert fast.model.config._attn_implementation == CAUSAL_SDPA
    assert fast.optimizer.defaults["fused"] and not naive.optimizer.defaults["foreach"]
    s1, s2 = _stream(), _stream()
    got = [(float(fast.train_step(s1)), naive.train_step(s2)) for _ in range(4)]
    a, b = map(np.array, zip(*got, strict=True))
    assert np.allclose(a, b, atol=1e-5), got
    assert a[-1] < a[0]  # it trains
    # (no parameter-wise check: the attention key bias has zero true gradient, and AdamW
    # turns the two paths' different rounding noise there into lr-sized steps)


def test_naive_trainer_for_a_run_starts_from_the_runs_initial_weights():
    cfg = SimpleNamespace(seed=3, model=TINY_MODEL, train=tiny_train_config())
    run = SimpleNamespace(cfg=cfg, tokenizer=range(VOCAB), eos=0, device=CPU)
    naive = NaiveTrainer.for_run(run)
    expected = _model(seed=3).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in naive.model.state_dict().items())


def test_losses_are_read_back_at_log_eval_and_end_steps_only():
    trainer = Trainer(_model(), tiny_train_config(log_every_steps=3, eval_every_steps=4), CPU)
    rec = Recorder()
    trainer.train(_stream(), steps=7, callbacks=[rec])
    read_at = [i.stage_step for i in rec.infos if i.losses]
    assert read_at == [3, 4, 6, 7]
    read = [v for i in rec.infos for v in i.losses]  # every step's loss, once, in order
    assert read == pytest.approx([float(i.loss_tensor) for i in rec.infos], abs=0)
    assert all(i.loss == float(i.loss_tensor) for i in rec.infos)


class _PoisonAfter(Callback):
    """Writes a NaN into the output layer after the hooks of `stage_step`."""

    def __init__(self, stage_step: int):
        self.stage_step, self.seen = stage_step, []

    def step_end(self, trainer, info):
        self.seen.append(info.stage_step)
        if info.stage_step == self.stage_step:
            with torch.no_grad():
                trainer.model.get_output_embeddings().weight[0, 0] = float("nan")


@pytest.mark.parametrize(("checkpoint_every", "hooks_run_for"), [(0, [1, 2, 3]), (3, [1, 2])])
def test_non_finite_loss_fails_at_the_next_read_back_naming_its_step(
    checkpoint_every, hooks_run_for
):
    """Step 3 is the first non-finite one; read-backs every 4 steps (and at checkpoints) find it
    before the hooks of the read-back step run, so no checkpoint holds the poisoned weights."""
    cfg = tiny_train_config(log_every_steps=4, checkpoint_every_steps=checkpoint_every)
    trainer = Trainer(_model(), cfg, CPU)
    poison = _PoisonAfter(2)
    with pytest.raises(StageFailed, match=r"non-finite training loss \(nan\) at step 3$"):
        trainer.train(_stream(), steps=10, callbacks=[poison])
    assert poison.seen == hooks_run_for


def test_save_refuses_weights_past_an_unchecked_non_finite_loss(tmp_path):
    trainer = Trainer(_model(), tiny_train_config(), CPU)
    trainer._pending.append((5, torch.tensor(float("inf"))))
    with pytest.raises(StageFailed, match="at step 5"):
        trainer.save(tmp_path / "ck", {})
    assert not (tmp_path / "ck").exists()


def _compile_works() -> str | None:
    try:
        torch.compile(lambda t: torch.sin(t) * 2)(torch.ones(4))
    except Exception as e:  # no C++ compiler, unsupported Python, ...
        return f"torch.compile does not work here: {type(e).__name__}: {str(e)[:200]}"
    return None


@pytest.mark.slow
def test_compiled_loss_gives_the_same_losses():
    reason = _compile_works()
    if reason:
        pytest.skip(reason)
    model = _model()
    plain = Trainer(copy.deepcopy(model), tiny_train_config(), CPU)
    compiled = Trainer(model, tiny_train_config(compile=True), CPU)
    s1, s2 = _stream(), _stream()
    for _ in range(3):
        a, b = float(plain.train_step(s1)), float(compiled.train_step(s2))
        assert b == pytest.approx(a, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_step_never_waits_for_the_device():
    cuda = torch.device("cuda")
    trainer = Trainer(_model(), tiny_train_config(precision="bf16", micro_batch_sequences=2), cuda)
    stream = _stream()
    trainer.train_step(stream)  # warm-up: lazy state (AdamW moments, cuBLAS handles)
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [trainer.train_step(stream) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(np.isfinite(float(v)) for v in losses)


def test_the_lm_builds_no_attention_mask_and_matches_plain_sdpa(monkeypatch):
    """No per-forward packed-sequence check (a host-device sync on a GPU, a materialized
    mask under compile): SDPA runs causal with no mask, and the outputs are those of
    transformers' own "sdpa" attention."""
    import transformers.masking_utils as masking

    model = _model().eval()
    ids = torch.randint(0, VOCAB, (3, T))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        model.set_attn_implementation("sdpa")
        theirs = model(input_ids=ids).logits
        model.set_attn_implementation(CAUSAL_SDPA)

        def no_mask_work(*args, **kwargs):
            raise AssertionError("a causal mask was prepared")

        monkeypatch.setattr(masking, "find_packed_sequence_indices", no_mask_work)
        monkeypatch.setattr(masking, "sdpa_mask", no_mask_work)
        again = model(input_ids=ids).logits
    assert model.config._attn_implementation == CAUSAL_SDPA
    assert torch.equal(ours, theirs) and torch.equal(ours, again)


def test_the_vocabulary_is_padded_to_the_configured_multiple(tmp_path):
    model = build_lm(TINY_MODEL.model_copy(update={"vocab_multiple": 128}), 50277, T, eos_id=0)
    assert model.get_input_embeddings().num_embeddings == 50304
    assert model.get_output_embeddings().out_features == 50304
    assert build_lm(TINY_MODEL, 50277, T, eos_id=0).get_input_embeddings().num_embeddings == 50277
    model.save_pretrained(tmp_path)  # an exported model names no attention of ours
    assert CAUSAL_SDPA not in (tmp_path / "config.json").read_text()
