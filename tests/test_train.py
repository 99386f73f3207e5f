"""The training loop: non-finite losses fail the stage; checkpoints continue bit-exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, FakeCorpus, random_docs, tiny_train_config

from mates.data.packing import PackedStream
from mates.errors import ArtifactError, StageFailed
from mates.lm import build_lm
from mates.train import Callback, Trainer, lr_at, make_optimizer

VOCAB, T = 64, 16
CPU = torch.device("cpu")


def _trainer(seed: int = 0, **cfg) -> Trainer:
    torch.manual_seed(seed)
    return Trainer(build_lm(TINY_MODEL, VOCAB, T, eos_id=0), tiny_train_config(**cfg), CPU)


def _stream(seed: int = 0) -> PackedStream:
    docs = random_docs(30, VOCAB, seed=1)
    return PackedStream(FakeCorpus(docs), np.arange(len(docs)), T, eos_id=0, seed=seed)


class Recorder(Callback):
    def __init__(self):
        self.steps, self.ended = [], []

    def step_end(self, trainer, info):
        self.steps.append(info)

    def train_end(self, trainer, info):
        self.ended.append(info)


def test_non_finite_loss_fails_the_stage():
    trainer = _trainer()
    with torch.no_grad():
        trainer.model.get_output_embeddings().weight[0, 0] = float("nan")
    with pytest.raises(StageFailed, match="non-finite") as exc:
        trainer.train(_stream(), steps=3, callbacks=[])
    assert "step 1" in str(exc.value)


def test_train_counts_steps_tokens_and_calls_hooks():
    trainer = _trainer(warmup_steps=4)
    rec = Recorder()
    info = trainer.train(_stream(), steps=5, callbacks=[rec], stage_step=2)
    assert [i.stage_step for i in rec.steps] == [3, 4, 5]
    assert [i.step for i in rec.steps] == [1, 2, 3]
    assert rec.ended == [info] and info.step == trainer.step == 3
    assert trainer.tokens == 3 * 4 * T == info.tokens
    assert [i.lr for i in rec.steps] == pytest.approx([1e-3 * k / 4 for k in (1, 2, 3)])
    assert all(np.isfinite(i.loss) for i in rec.steps)


def test_loss_decreases_on_a_repeated_batch():
    trainer = _trainer(lr=1e-2)
    docs = random_docs(2, VOCAB, seed=3, min_len=30, max_len=31)
    stream = PackedStream(FakeCorpus(docs), np.arange(2), T, 0, seed=0)
    losses = [trainer.train_step(stream) for _ in range(15)]
    assert losses[-1] < losses[0] - 0.5


def test_lr_schedule_is_linear_warmup_then_constant():
    cfg = tiny_train_config(lr=1e-3, warmup_steps=4)
    assert [lr_at(s, cfg) for s in range(6)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    )
    assert lr_at(0, tiny_train_config(warmup_steps=0)) == 1e-3


def test_weight_decay_only_on_matrices():
    torch.manual_seed(0)
    model = build_lm(TINY_MODEL, VOCAB, T, eos_id=0)
    opt = make_optimizer(model, tiny_train_config(weight_decay=0.1), CPU)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_gradient_accumulation_matches_the_full_batch():
    full, accum = _trainer(), _trainer(micro_batch_sequences=2)
    for _ in range(2):
        a, b = float(full.train_step(_stream())), float(accum.train_step(_stream()))
        assert a == pytest.approx(b, abs=1e-5)
    for p, q in zip(full.model.parameters(), accum.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_checkpoint_round_trip_continues_bit_identically(tmp_path):
    reference, stream = _trainer(warmup_steps=3), _stream()
    reference.train(stream, steps=4, callbacks=[])
    reference.save(tmp_path / "ck", {"stage": 0, "stage_step": 4, "stream": stream.state_dict()})
    expected = [reference.train_step(stream) for _ in range(3)]

    resumed = _trainer(seed=123, warmup_steps=3)  # different init: everything must come from disk
    meta = resumed.load(tmp_path / "ck")
    assert (resumed.step, resumed.tokens) == (4, 4 * 4 * T)
    assert meta["stage"] == 0 and meta["stage_step"] == 4
    stream2 = _stream()
    stream2.load_state_dict(meta["stream"])
    got = [resumed.train_step(stream2) for _ in range(3)]
    assert got == expected  # bit-identical, not approximately equal
    for p, q in zip(reference.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_checkpoint_restores_rng_state(tmp_path):
    trainer = _trainer()
    torch.manual_seed(42)
    trainer.save(tmp_path / "ck", {"stream": {}})
    after_save = torch.rand(3)
    torch.manual_seed(0)
    trainer.load(tmp_path / "ck")
    assert torch.equal(torch.rand(3), after_save)


def test_a_checkpoint_from_more_gpus_restores_the_rng_of_those_this_process_sees(
    tmp_path, monkeypatch
):
    trainer = _trainer()
    trainer.save(tmp_path / "ck", {"stream": {}})
    rng = torch.load(tmp_path / "ck" / "rng.pt", weights_only=True)
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]  # saved on 4 GPUs
    torch.save({**rng, "cuda": states}, tmp_path / "ck" / "rng.pt")
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, i: restored.append((i, int(state[0])))
    )
    trainer.load(tmp_path / "ck")
    assert restored == [(0, 0)]


def test_checkpoint_is_complete_and_atomic(tmp_path):
    trainer = _trainer()
    trainer.train(_stream(), steps=1, callbacks=[])
    trainer.save(tmp_path / "ck", {"stage": 2})
    names = {p.name for p in (tmp_path / "ck").iterdir()}
    assert {"model.safetensors", "optimizer.pt", "rng.pt", "trainer.json"} <= names
    meta = json.loads((tmp_path / "ck" / "trainer.json").read_text())
    assert meta["lr_schedule"]["kind"] == "linear-warmup-constant"
    assert {k: v for k, v in meta.items() if k != "lr_schedule"} == {
        "step": 1,
        "tokens": 4 * T,
        "stage": 2,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporaries left


def test_missing_checkpoint_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="unreadable"):
        _trainer().load(tmp_path / "missing")
    trainer = _trainer()
    trainer.save(tmp_path / "ck", {})
    (tmp_path / "ck" / "trainer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ArtifactError, match="unreadable"):
        trainer.load(tmp_path / "ck")


@pytest.mark.parametrize(
    ("name", "content"),
    [("model.safetensors", b"garbage"), ("optimizer.pt", b"garbage"), ("rng.pt", b"")],
)
def test_corrupt_checkpoint_file_is_an_artifact_error(tmp_path, name, content):
    trainer = _trainer()
    trainer.save(tmp_path / "ck", {})
    (tmp_path / "ck" / name).write_bytes(content)
    with pytest.raises(ArtifactError, match="unreadable"):
        trainer.load(tmp_path / "ck")
