"""Held-out sets (full text and cloze), the cooldown branch, and the FLOPs ledger's formulas."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_MODEL, tiny_train_config, write_jsonl

from mates.artifacts import RunPaths, read_json
from mates.config import HeldoutSetConfig, ModelConfig
from mates.data.packing import PackedStream
from mates.data.reference import load_heldout, load_reference, load_text_documents, reference_texts
from mates.data.tokenizer import load_tokenizer
from mates.errors import DataError
from mates.flops import linear_params, lm_cost
from mates.lm import build_lm, reference_loss, row_losses
from mates.train import Trainer

# --------------------------------------------------------------------------- held-out sets


def test_text_documents_score_every_token_once(bpe_tokenizer, tmp_path):
    texts = [
        "the market shares rose sharply after the report " * 6,
        "players won the match",
        "the film star",
    ]
    path = write_jsonl(
        tmp_path / "held.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    )
    ref = load_text_documents(path, bpe_tokenizer, seq_tokens=8)
    lengths = [len(bpe_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert ref.num_docs == 3 and ref.scored_tokens == sum(lengths)
    per_doc = torch.zeros(3, dtype=torch.long).index_add_(0, ref.docs, (ref.labels != -100).sum(1))
    assert per_doc.tolist() == lengths  # each document's tokens, each once
    assert len(ref) > 3  # the long document was cut into several rows
    assert load_text_documents(path, bpe_tokenizer, 8, max_documents=1).num_docs == 1


def test_a_full_text_reference_scores_every_token_and_a_cloze_reader_names_the_setting(
    bpe_tokenizer, tmp_path
):
    texts = ["the market shares rose sharply after the report " * 6, "players won the match"]
    path = write_jsonl(
        tmp_path / "ref.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    )
    ref = load_reference(path, bpe_tokenizer, 8, kind="text")
    assert ref.num_docs == 2 and ref.scored_tokens == sum(
        len(bpe_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts
    )
    assert load_reference(path, bpe_tokenizer, 8, max_examples=1, kind="text").num_docs == 1
    assert reference_texts(path, kind="text") == texts  # what DSIR targets
    with pytest.raises(DataError, match="`data.reference_kind: text`"):
        load_reference(path, bpe_tokenizer, 8)  # read as cloze: no `context`
    with pytest.raises(DataError, match="reference set .* has no documents"):
        load_reference(write_jsonl(tmp_path / "empty.jsonl", []), bpe_tokenizer, 8, kind="text")


def test_text_set_errors_name_the_line(bpe_tokenizer, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"body": "no text"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*`text`"):
        load_text_documents(bad, bpe_tokenizer, 8)
    with pytest.raises(DataError, match="does not exist"):
        load_text_documents(tmp_path / "missing.jsonl", bpe_tokenizer, 8)


def test_row_losses_agree_with_the_mean_loss(bpe_tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "cloze.jsonl",
        [
            {"context": "the market", "continuation": " rose"},
            {"context": "players won the", "continuation": " match"},
        ],
    )
    spec = HeldoutSetConfig(name="c", path=path, kind="cloze")
    ref = load_heldout(spec, bpe_tokenizer, 16)
    torch.manual_seed(0)
    model = build_lm(TINY_MODEL, len(bpe_tokenizer), 16, bpe_tokenizer.eos_token_id)
    sums, counts, correct = row_losses(model, ref, 1, "fp32")
    assert float(sums.sum() / counts.sum()) == pytest.approx(
        reference_loss(model, ref, 2), rel=1e-5
    )
    assert counts.tolist() == (ref.labels != -100).sum(1).tolist() and correct.dtype == torch.bool


def test_heldout_sets_config(tiny_config_factory):
    cfg = tiny_config_factory(
        "data.heldout_sets=[{name: t, path: data/demo/heldout-text.jsonl, kind: text}]",
        "data.primary_heldout=t",
    )
    assert [h.name for h in cfg.data.heldout_specs()] == [
        "heldout",
        "t",
    ] and cfg.data.primary == "t"
    assert cfg.data.heldout_sets[0].path.is_absolute()
    with pytest.raises(Exception, match="`data.primary_heldout` 'x' names no held-out set"):
        tiny_config_factory("data.primary_heldout=x")
    with pytest.raises(Exception, match="unique"):
        tiny_config_factory("data.heldout_sets=[{name: heldout, path: a.jsonl, kind: text}]")


# --------------------------------------------------------------------------- cooldown


def _trainer_and_stream():
    torch.manual_seed(0)
    model = build_lm(TINY_MODEL, 64, 16, 0)
    trainer = Trainer(model, tiny_train_config(lr=1e-2), torch.device("cpu"))

    class Corpus:  # the two methods PackedStream reads
        def token_ids(self, i):
            return torch.arange(1, 40).roll(i).numpy()

    stream = PackedStream(Corpus(), list(range(8)), 16, 0, seed=0)
    return trainer, stream


def test_cooldown_branch_leaves_the_run_untouched():
    trainer, stream = _trainer_and_stream()
    for _ in range(3):
        trainer.train_step(stream)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt_before = {
        k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)}
        for k, s in trainer.optimizer.state_dict()["state"].items()
    }
    step, tokens = trainer.step, trainer.tokens
    branch = trainer.cooldown_branch(stream, 4)
    assert trainer.step == step and trainer.tokens == tokens
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    for k, s in trainer.optimizer.state_dict()["state"].items():
        assert all(torch.equal(t, s[n]) for n, t in opt_before[k].items())
    changed = [k for k, v in branch.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the branch did train


def test_cooldown_lr_decays_linearly_to_zero(monkeypatch):
    trainer, stream = _trainer_and_stream()
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **kw):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    trainer.cooldown_branch(stream, 4)
    assert seen == pytest.approx([1e-2, 0.75e-2, 0.5e-2, 0.25e-2])


@pytest.mark.slow
def test_a_run_writes_cooldown_points(tiny_run):
    paths = RunPaths(tiny_run["dir"])
    for k in range(3):
        c = read_json(paths.cooldown(k))
        m = read_json(paths.manifest)["stages"][k]
        assert (
            c["stage"] == k and c["tokens"] == m["metrics"]["tokens"] and c["cooldown_steps"] >= 1
        )
        h = c["sets"]["heldout"]
        assert h["kind"] == "cloze" and 0 <= h["accuracy"] <= 1
        assert sum(h["doc_sums"]) / sum(h["doc_counts"]) == pytest.approx(h["loss"], abs=1e-3)
        assert m["timings"]["cooldown_eval"] > 0 and m["metrics"]["flops"]["cooldown_eval"] > 0


# --------------------------------------------------------------------------- FLOPs


def test_linear_params_match_a_hand_count():
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48)
    model = build_lm(cfg, 100, 16, 0)
    d, f, L, V = 32, 48, 2, 100
    # per layer: qkv 3d²+3d, dense d²+d, up d·f+f, down f·d+d; then the untied output d·V
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    assert linear_params(model) == L * per_layer + d * V
    cost = lm_cost(model, L, d, 16)
    assert cost.head_params == d * V
    assert cost.train(10) == 10 * (6 * (L * per_layer + d * V) + 12 * L * d * 16)
    assert cost.forward(10) == 10 * (2 * (L * per_layer + d * V) + 4 * L * d * 16)
    # the output layer only on scored positions: 10 inputs, 2 scored
    assert cost.forward(10, 2) == 10 * (2 * L * per_layer + 4 * L * d * 16) + 2 * 2 * d * V


def test_a_runs_ledger_matches_the_formulas(tiny_run):
    cfg, paths = tiny_run["cfg"], RunPaths(tiny_run["dir"])
    m = read_json(paths.manifest)
    tok = load_tokenizer(paths.tokenizer)
    model = build_lm(cfg.model, len(tok), cfg.train.seq_tokens, tok.eos_token_id)
    cost = lm_cost(model, cfg.model.num_layers, cfg.model.hidden_size, cfg.train.seq_tokens)
    tc = cfg.train
    for st in m["stages"]:
        steps = cfg.stages.stage0_steps if st["stage"] == 0 else cfg.stages.stage_steps
        assert st["metrics"]["flops"]["train"] == cost.train(
            steps * tc.batch_sequences * tc.seq_tokens
        )
    flops0 = m["stages"][0]["metrics"]["flops"]
    assert {"train", "probe", "fit", "score", "cooldown_eval"} <= set(flops0)
    assert "probe" not in m["stages"][-1]["metrics"]["flops"]  # the last stage selects nothing
