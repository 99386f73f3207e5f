"""Reference and held-out sets: LAMBADA-style continuation masks, plain text, truncation."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import write_jsonl

from mates.data.reference import IGNORE, load_reference
from mates.errors import DataError

PAIRS = [
    {"context": "the market shares rose sharply after the", "continuation": " report"},
    {"context": "players won the", "continuation": " match and the award"},
    {"context": "the film star thanked fans for the", "continuation": " award"},
]


def _tok(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _scored(ref, i: int) -> list[int]:
    return ref.labels[i][ref.labels[i] != IGNORE].tolist()


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"context": "a b c", "continuation": ""}, "missing or empty `continuation`"),
        ({"context": "a b c", "continuation": "   "}, "missing or empty `continuation`"),
        ({"context": "a b c"}, "missing or empty `continuation`"),
        ({"continuation": " x"}, "missing or non-string `context`"),
        ("not json", "not valid JSON"),
        (b'{"context": "\xff", "continuation": " x"}', "not valid UTF-8"),
        ("[1]", "row must be a JSON object"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, bpe_tokenizer, row, reason):
    path = write_jsonl(tmp_path / "ref.jsonl", [PAIRS[0], "", row])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: {re.escape(reason)}"):
        load_reference(path, bpe_tokenizer, seq_tokens=32)


def test_labels_mask_only_the_continuation(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "ref.jsonl", PAIRS)
    ref = load_reference(path, bpe_tokenizer, seq_tokens=32)
    assert len(ref) == len(PAIRS)
    expected = sorted(_tok(bpe_tokenizer, p["continuation"]) for p in PAIRS)
    assert sorted(_scored(ref, i) for i in range(len(ref))) == expected
    assert ref.scored_tokens == sum(len(c) for c in expected)
    for i in range(len(ref)):
        n = int(ref.lengths[i])
        ids, labels = ref.input_ids[i], ref.labels[i]
        scored = (labels != IGNORE).nonzero().flatten()
        n_cont = len(scored)
        # the scored positions are the last n_cont predictions of the row, contiguous
        assert scored.tolist() == list(range(n - 1 - n_cont, n - 1))
        # labels are already shifted: position t predicts token t + 1
        assert torch.equal(labels[scored], ids[scored + 1])
        assert (labels[n - 1 :] == IGNORE).all()  # nothing scored on or after the last token


def test_rows_are_context_then_continuation(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "ref.jsonl", PAIRS[:1])
    ref = load_reference(path, bpe_tokenizer, seq_tokens=32)
    want = _tok(bpe_tokenizer, PAIRS[0]["context"]) + _tok(bpe_tokenizer, PAIRS[0]["continuation"])
    assert ref.input_ids[0, : int(ref.lengths[0])].tolist() == want


def test_rows_are_sorted_by_length_and_right_padded(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "ref.jsonl", PAIRS)
    ref = load_reference(path, bpe_tokenizer, seq_tokens=32)
    assert ref.lengths.tolist() == sorted(ref.lengths.tolist())
    assert ref.input_ids.shape == (3, int(ref.lengths.max()))
    for i in range(len(ref)):
        assert (ref.labels[i, int(ref.lengths[i]) :] == IGNORE).all()


def test_long_context_is_truncated_from_the_left(tmp_path, bpe_tokenizer):
    context = " ".join(f"the market {w}" for w in ["rose", "fell", "won", "said"] * 10)
    row = {"context": context, "continuation": " award"}
    path = write_jsonl(tmp_path / "ref.jsonl", [row])
    seq = 16
    ref = load_reference(path, bpe_tokenizer, seq_tokens=seq)
    cont = _tok(bpe_tokenizer, row["continuation"])
    ctx = _tok(bpe_tokenizer, context)
    assert len(ctx) + len(cont) > seq
    assert int(ref.lengths[0]) == seq
    assert ref.input_ids[0].tolist() == ctx[-(seq - len(cont)) :] + cont
    assert _scored(ref, 0) == cont


def test_continuation_longer_than_the_sequence_is_rejected(tmp_path, bpe_tokenizer):
    row = {"context": "a", "continuation": " the market rose " * 20}
    path = write_jsonl(tmp_path / "ref.jsonl", [row])
    with pytest.raises(DataError, match="continuation is longer than 16 tokens"):
        load_reference(path, bpe_tokenizer, seq_tokens=16)


def test_empty_context_starts_with_eos(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "ref.jsonl", [{"context": "", "continuation": " award"}])
    ref = load_reference(path, bpe_tokenizer, seq_tokens=16)
    assert ref.input_ids[0, 0].item() == bpe_tokenizer.eos_token_id
    assert _scored(ref, 0) == _tok(bpe_tokenizer, " award")


def test_max_examples_and_empty_sets(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "ref.jsonl", PAIRS)
    assert len(load_reference(path, bpe_tokenizer, seq_tokens=32, max_examples=2)) == 2
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="has no examples"):
        load_reference(empty, bpe_tokenizer, seq_tokens=32)
    with pytest.raises(DataError, match="does not exist"):
        load_reference(tmp_path / "nope.jsonl", bpe_tokenizer, seq_tokens=32)


def test_plain_text_reference_scores_every_token(tmp_path, bpe_tokenizer):
    text = "the market shares rose sharply after the report. " * 12
    path = tmp_path / "ref.txt"
    path.write_text(text, encoding="utf-8")
    seq = 16
    ref = load_reference(path, bpe_tokenizer, seq_tokens=seq)
    toks = _tok(bpe_tokenizer, text)
    assert len(ref) == -(-len(toks) // seq)
    assert int(ref.lengths.sum()) == len(toks)  # every token is in some row
    assert ref.input_ids.shape[1] <= seq
    assert ref.scored_tokens == sum(int(n) - 1 for n in ref.lengths)
    rows = sorted(ref.input_ids[i, : int(ref.lengths[i])].tolist() for i in range(len(ref)))
    chunks = sorted(toks[i : i + seq] for i in range(0, len(toks), seq))
    assert rows == chunks
    for i in range(len(ref)):
        n = int(ref.lengths[i])
        assert torch.equal(ref.labels[i, : n - 1], ref.input_ids[i, 1:n])
        assert (ref.labels[i, n - 1 :] == IGNORE).all()


def test_plain_text_reference_must_have_text(tmp_path, bpe_tokenizer):
    path = tmp_path / "ref.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="has no text"):
        load_reference(path, bpe_tokenizer, seq_tokens=16)
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_reference(path, bpe_tokenizer, seq_tokens=16)
