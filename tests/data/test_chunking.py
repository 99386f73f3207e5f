"""Cutting documents into units of at most a token budget (`mates.data.chunking`) and
storing them as `<id>#<n>` in a tokenized corpus."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mates.data.chunking import chunk_texts
from mates.data.corpus import tokenize_corpus
from mates.errors import DataError


def _counter(tok):
    return lambda texts: [len(t) for t in tok(list(texts), add_special_tokens=False)["input_ids"]]


def _encoder(tok):
    backend = tok.backend_tokenizer
    return lambda texts: [
        (e.ids, [a for a, _ in e.offsets])
        for e in backend.encode_batch(list(texts), add_special_tokens=False)
    ]


def chunk_text(text: str, tok, limit: int) -> list[str]:
    encode = _encoder(tok)
    ((_, starts),) = encode([text])
    out = chunk_texts([text], [starts], encode, limit)[0]
    for chunk, ids in out:  # each chunk carries exactly its own tokens
        assert ids == tok(chunk, add_special_tokens=False)["input_ids"]
    return [c for c, _ in out]


def _words(text: str) -> list[str]:
    return text.split()


def test_a_short_text_comes_back_whole(bpe_tokenizer):
    assert chunk_text("  the market rose  ", bpe_tokenizer, 64) == ["the market rose"]


def test_paragraph_boundaries_are_preferred(bpe_tokenizer):
    count = _counter(bpe_tokenizer)
    par = " ".join(["the market shares rose sharply."] * 3)
    text = "\n\n".join([par] * 4)
    limit = count([par])[0] + 2  # one paragraph fits, two do not
    chunks = chunk_text(text, bpe_tokenizer, limit)
    assert chunks == [par] * 4


def test_sentences_then_words_then_characters_when_nothing_coarser_fits(bpe_tokenizer):
    count = _counter(bpe_tokenizer)
    sentence = "the minister said players won the match."
    text = " ".join([sentence] * 6)
    chunks = chunk_text(text, bpe_tokenizer, count([sentence])[0] + 1)
    assert chunks == [sentence] * 6
    long_word = "x" * 400  # no boundary at all: cut between tokens
    parts = chunk_text(long_word, bpe_tokenizer, 8)
    assert "".join(parts) == long_word and all(n <= 8 for n in count(parts))


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(
        st.sampled_from(["the", "market", "rose.", "film\n\n", "star\n", "won!", "a" * 30]),
        min_size=1,
        max_size=120,
    ),
    limit=st.integers(min_value=8, max_value=48),
)
def test_chunks_respect_the_limit_and_keep_every_word_in_order(bpe_tokenizer, words, limit):
    count = _counter(bpe_tokenizer)
    text = " ".join(words)
    chunks = chunk_text(text, bpe_tokenizer, limit)
    assert all(c and c == c.strip() for c in chunks)
    assert all(n <= limit for n in count(chunks))
    # nothing is lost or reordered: only whitespace between chunks may differ
    assert "".join("".join(_words(c)) for c in chunks) == "".join(_words(text))


def _corpus(tmp_path, rows) -> object:
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_tokenized_corpus_stores_chunks_with_their_own_tokens(bpe_tokenizer, tmp_path):
    long = "\n\n".join(
        " ".join(["the market shares rose sharply after the report."] * 3) for _ in range(6)
    )
    path = _corpus(
        tmp_path,
        [
            {"id": "a", "text": "the film star", "domain": "x"},
            {"id": "b", "text": long, "domain": "y"},
        ],
    )
    corpus = tokenize_corpus(path, bpe_tokenizer, tmp_path / "tok", chunk_tokens=32)
    assert corpus.ids[0] == "a" and corpus.ids[1:] == [f"b#{n}" for n in range(len(corpus) - 1)]
    assert len(corpus) > 3
    assert corpus.meta["chunked_documents"] == 1 and corpus.meta["source_documents"] == 2
    for i in range(len(corpus)):
        toks = bpe_tokenizer(corpus.text(i), add_special_tokens=False)["input_ids"]
        assert corpus.token_ids(i).tolist() == toks and len(toks) <= 32
        assert corpus.domain(i) == ("x" if i == 0 else "y")


def test_a_chunk_id_that_collides_with_a_document_id_is_named(bpe_tokenizer, tmp_path):
    long = " ".join(["the market shares rose sharply after the report."] * 20)
    path = _corpus(tmp_path, [{"id": "b", "text": long}, {"id": "b#0", "text": "the film star"}])
    with pytest.raises(DataError, match=r"'b#0'.*'b'.*rename"):
        tokenize_corpus(path, bpe_tokenizer, tmp_path / "tok", chunk_tokens=16)
