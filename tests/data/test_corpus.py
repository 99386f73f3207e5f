"""Corpus reading (JSONL and Parquet), row validation and memory-mapped tokenization."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_jsonl

from mates.data.corpus import ReadStats, TokenizedCorpus, iter_corpus, tokenize_corpus
from mates.errors import DataError

ROWS = [
    {"id": "a", "text": "the market rose", "domain": "news"},
    {"id": "b", "text": "players won the match\nand then more", "domain": "sport"},
    {"id": "c", "text": "Unicode: café – naïve ✓", "domain": None},
    {"id": "d", "text": "the film star thanked fans", "domain": "news", "extra": 1},
]


def _triples(rows) -> list[tuple]:
    return [(r.id, r.text, r.domain) for r in rows]


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_jsonl_and_parquet_read_the_same(tmp_path):
    from_jsonl = list(iter_corpus(write_jsonl(tmp_path / "c.jsonl", ROWS)))
    from_parquet = list(iter_corpus(_write_parquet(tmp_path / "c.parquet", ROWS)))
    expected = [(r["id"], r["text"], r["domain"]) for r in ROWS]
    assert _triples(from_jsonl) == expected
    assert _triples(from_parquet) == expected


def test_custom_fields_and_no_domain(tmp_path):
    rows = [{"doc": "x1", "body": "hello there", "domain": "d"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    got = list(iter_corpus(path, id_field="doc", text_field="body", domain_field=None))
    assert _triples(got) == [("x1", "hello there", None)]


def test_blank_lines_are_ignored_but_counted_in_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [ROWS[0], "", "   ", {"text": "no id"}])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:4: missing or non-string `id`"):
        list(iter_corpus(path))


BAD_ROWS = [
    pytest.param({"text": "no id here"}, r"missing or non-string `id`", id="missing-id"),
    pytest.param({"id": "", "text": "blank id"}, r"missing or non-string `id`", id="blank-id"),
    pytest.param({"id": 5, "text": "numeric id"}, r"missing or non-string `id`", id="int-id"),
    pytest.param({"id": "a", "text": "again"}, r"duplicate id 'a'", id="duplicate-id"),
    pytest.param({"id": "e", "text": "   "}, r"empty `text` \(id 'e'\)", id="empty-text"),
    pytest.param({"id": "e"}, r"missing or non-string `text`", id="missing-text"),
    pytest.param(b'{"id": "e", "text": "caf\xe9"}', r"not valid UTF-8", id="non-utf8"),
    pytest.param('{"id": "e", "text": ', r"not valid JSON", id="bad-json"),
    pytest.param("[1, 2]", r"row must be a JSON object", id="not-an-object"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_ROWS)
def test_bad_jsonl_row_names_file_and_line(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "c.jsonl", [ROWS[0], ROWS[1], bad, ROWS[3]])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: {reason}"):
        list(iter_corpus(path))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"id": None, "text": "no id", "domain": "x"}, r"missing or non-string `id`"),
        ({"id": "a", "text": "dup", "domain": "x"}, r"duplicate id 'a'"),
        ({"id": "e", "text": "", "domain": "x"}, r"empty `text`"),
    ],
)
def test_bad_parquet_row_names_file_and_row(tmp_path, bad, reason):
    rows = [dict(ROWS[0]), dict(ROWS[1]), bad]
    for r in rows:
        r.pop("extra", None)
    path = _write_parquet(tmp_path / "c.parquet", rows)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: {reason}"):
        list(iter_corpus(path))


def test_unreadable_parquet_and_missing_file(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(iter_corpus(junk))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_corpus(tmp_path / "missing.jsonl"))


def _messy_rows() -> list:
    return [
        ROWS[0],
        {"text": "no id"},
        ROWS[1],
        {"id": "a", "text": "duplicate"},
        {"id": "e", "text": " "},
        b'{"id": "f", "text": "\xff\xfe"}',
        "{broken",
        ROWS[2],
    ]


def test_skip_mode_skips_and_counts(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", _messy_rows())
    stats = ReadStats()
    got = list(iter_corpus(path, on_bad_row="skip", stats=stats))
    assert [r.id for r in got] == ["a", "b", "c"]
    assert stats.rows == 3 and stats.skipped == 5
    assert sum(stats.skip_reasons.values()) == 5
    assert stats.skip_reasons["duplicate id"] == 1


def test_skipped_rows_are_recorded_in_meta(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", _messy_rows())
    corpus = tokenize_corpus(path, bpe_tokenizer, tmp_path / "tok", on_bad_row="skip")
    assert corpus.ids == ["a", "b", "c"]
    assert corpus.meta["num_docs"] == 3
    assert corpus.meta["skipped_rows"] == 5
    assert sum(corpus.meta["skip_reasons"].values()) == 5
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: "):
        tokenize_corpus(path, bpe_tokenizer, tmp_path / "tok-strict")
    assert not (tmp_path / "tok-strict").exists()  # no half-written artifact


@pytest.mark.parametrize(
    "rows", [[], [{"text": "no id"}, {"id": "x", "text": ""}]], ids=["empty-file", "all-rows-bad"]
)
def test_empty_pool_is_a_data_error(tmp_path, bpe_tokenizer, rows):
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match="no usable documents"):
        tokenize_corpus(path, bpe_tokenizer, tmp_path / "tok", on_bad_row="skip")
    assert not (tmp_path / "tok").exists()


@pytest.fixture
def tokenized(tmp_path, bpe_tokenizer) -> tuple[TokenizedCorpus, Path]:
    path = write_jsonl(tmp_path / "c.jsonl", ROWS)
    return tokenize_corpus(path, bpe_tokenizer, tmp_path / "tok"), path


def test_tokenize_round_trips_text_and_tokens_by_id(tokenized, bpe_tokenizer):
    corpus, _ = tokenized
    assert len(corpus) == len(ROWS)
    for row in reversed(ROWS):
        i = corpus.index_of(row["id"])
        assert corpus.text(i) == row["text"]
        expected = bpe_tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        assert corpus.token_ids(i).tolist() == expected
        assert bpe_tokenizer.decode(corpus.token_ids(i).tolist()) == row["text"]
        assert corpus.domain(i) == row["domain"]
    assert int(corpus.num_tokens().sum()) == corpus.meta["num_tokens"]
    idx = corpus.indices_of(["d", "a"])
    assert idx.tolist() == [3, 0]
    assert corpus.num_tokens(idx).tolist() == [len(corpus.token_ids(3)), len(corpus.token_ids(0))]
    assert corpus.tokens.dtype == np.uint16  # vocab fits


def test_index_of_unknown_id_is_a_data_error(tokenized):
    corpus, _ = tokenized
    with pytest.raises(DataError, match="unknown document id 'zzz'"):
        corpus.index_of("zzz")
    with pytest.raises(DataError, match="unknown document id 'zzz'"):
        corpus.indices_of(["a", "zzz"])


def test_tokenized_corpus_is_reused_not_rebuilt(tokenized, bpe_tokenizer, tmp_path):
    corpus, path = tokenized
    path.unlink()  # the source is not read again
    again = tokenize_corpus(path, bpe_tokenizer, tmp_path / "tok")
    assert again.ids == corpus.ids
    assert TokenizedCorpus(tmp_path / "tok").text(1) == ROWS[1]["text"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries
