"""Sequence packing: no padding, shifted labels, exact resume, counted epochs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import FakeCorpus, write_jsonl

from mates.data.corpus import tokenize_corpus
from mates.data.packing import PackedStream

EOS = 0
T = 8


def _docs() -> list[list[int]]:
    """Ten documents with distinct, recognisable tokens (doc d holds 100*d+1 ...)."""
    return [[100 * d + j for j in range(1, 3 + (d * 7) % 11)] for d in range(1, 11)]


def _stream(seed: int = 0, docs=None, indices=None) -> PackedStream:
    docs = docs or _docs()
    corpus = FakeCorpus(docs)
    idx = np.arange(len(docs)) if indices is None else np.asarray(indices)
    return PackedStream(corpus, idx, T, EOS, seed)


def _flat_inputs(stream: PackedStream, batches: int, n: int = 3) -> list[int]:
    out: list[int] = []
    for _ in range(batches):
        x, _ = stream.next_batch(n)
        out.extend(x.flatten().tolist())
    return out


def _segments(tokens: list[int]) -> list[tuple[int, ...]]:
    """Split a token stream at EOS; the last (possibly cut) segment is dropped."""
    segs, cur = [], []
    for t in tokens:
        if t == EOS:
            segs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return segs


def test_no_padding_every_token_is_document_text_or_eos():
    docs = _docs()
    n_tokens = sum(len(d) + 1 for d in docs)
    flat = _flat_inputs(_stream(), batches=-(-3 * n_tokens // (3 * T)))
    segs = _segments(flat)
    # two full epochs: each is a permutation of the documents, back to back, nothing in between
    assert len(segs) >= 2 * len(docs)
    as_tuples = {tuple(d) for d in docs}
    assert sorted(segs[: len(docs)]) == sorted(as_tuples)
    assert sorted(segs[len(docs) : 2 * len(docs)]) == sorted(as_tuples)
    assert flat[: len(segs[0])] == list(segs[0])  # the stream starts at a document's start


def test_labels_are_inputs_shifted_by_one_across_rows_and_batches():
    stream = _stream()
    xs, ys = [], []
    for _ in range(4):
        x, y = stream.next_batch(3)
        assert x.shape == y.shape == (3, T) and x.dtype == torch.long
        assert torch.equal(y[:, :-1], x[:, 1:])
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.equal(y[:-1, -1], x[1:, 0])  # each row's last target opens the next row
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])


def test_state_dict_resumes_the_exact_stream():
    a = _stream(seed=3)
    _flat_inputs(a, batches=7)  # crosses an epoch boundary (about 70 tokens per epoch)
    assert a.epochs_started >= 1
    state = json.loads(json.dumps(a.state_dict()))  # as stored in a checkpoint's trainer.json
    expected = [a.next_batch(3) for _ in range(6)]

    b = _stream(seed=3)
    _flat_inputs(b, batches=2)  # a different cursor that must be overwritten
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, [b.next_batch(3) for _ in range(6)], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert b.epochs_started == a.epochs_started


def test_epochs_started_counts_repeats():
    docs = _docs()
    per_epoch = sum(len(d) + 1 for d in docs)
    stream = _stream()
    assert stream.epochs_started == 0
    consumed = 0
    while consumed + T <= per_epoch - T:  # stay within the first epoch (one token of look-ahead)
        stream.next_batch(1)
        consumed += T
    assert stream.epochs_started == 0
    while consumed < int(2.5 * per_epoch):
        stream.next_batch(1)
        consumed += T
    assert stream.epochs_started == 2


def test_order_is_seeded_and_reshuffled_each_epoch():
    docs = _docs()
    per_epoch_batches = -(-sum(len(d) + 1 for d in docs) * 2 // (3 * T))
    a = _segments(_flat_inputs(_stream(seed=1), per_epoch_batches))
    b = _segments(_flat_inputs(_stream(seed=1), per_epoch_batches))
    c = _segments(_flat_inputs(_stream(seed=2), per_epoch_batches))
    n = len(docs)
    assert a == b
    assert a[:n] != c[:n]
    assert a[:n] != a[n : 2 * n]


def test_only_the_selected_documents_are_packed():
    docs = _docs()
    chosen = [1, 4, 7]
    flat = _flat_inputs(_stream(indices=chosen), batches=10)
    assert set(_segments(flat)) == {tuple(docs[i]) for i in chosen}


def test_empty_selection_is_rejected():
    with pytest.raises(ValueError, match="empty selection"):
        _stream(indices=[])


def test_packs_a_real_tokenized_corpus(tmp_path, bpe_tokenizer):
    rows = [
        {"id": f"d{i}", "text": f"the market rose {i} times after the report"} for i in range(6)
    ]
    corpus = tokenize_corpus(write_jsonl(tmp_path / "c.jsonl", rows), bpe_tokenizer, tmp_path / "t")
    eos = bpe_tokenizer.eos_token_id
    stream = PackedStream(corpus, np.arange(len(corpus)), T, eos, seed=0)
    x, _ = stream.next_batch(20)
    segs = []
    cur: list[int] = []
    for t in x.flatten().tolist():
        if t == eos:
            segs.append(cur)
            cur = []
        else:
            cur.append(t)
    texts = sorted(bpe_tokenizer.decode(s) for s in segs[: len(rows)])
    assert texts == sorted(r["text"] for r in rows)
