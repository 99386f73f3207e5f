"""Corpora as they come (mates.data.sources): every format, shards by glob and by list,
IDs unique across shards, and bad input named by file (and line), all read for real."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from mates.config import config_from_dict
from mates.data.corpus import iter_corpus, tokenize_corpus
from mates.data.sources import expand_pool
from mates.data.tokenizer import train_bpe
from mates.errors import DataError


def rows(prefix: str, n: int) -> list[dict]:
    return [
        {"id": f"{prefix}{i}", "text": f"text {prefix} number {i}", "domain": prefix}
        for i in range(n)
    ]


def jsonl_bytes(items: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in items).encode()


def write(path: Path, items: list[dict]) -> Path:
    name = path.name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(jsonl_bytes(items)))
    elif name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(items)))
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(items), path)
    else:
        path.write_bytes(jsonl_bytes(items))
    return path


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet"])
def test_each_file_format_reads_the_same_rows(tmp_path, name):
    path = write(tmp_path / name, rows("a", 5))
    got = [(r.id, r.text, r.domain) for r in iter_corpus(path)]
    assert got == [(r["id"], r["text"], r["domain"]) for r in rows("a", 5)]


def test_a_saved_hugging_face_dataset_reads_like_a_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows("h", 4)).save_to_disk(str(tmp_path / "ds"))
    assert [r.id for r in iter_corpus(tmp_path / "ds")] == ["h0", "h1", "h2", "h3"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows("t", 2))}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(DataError, match="several splits"):
        list(iter_corpus(tmp_path / "dd"))
    assert [r.id for r in iter_corpus(tmp_path / "dd" / "train")] == ["t0", "t1"]


def test_a_glob_reads_its_shards_sorted_and_a_list_in_its_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write(shards / "part-01.jsonl.zst", rows("b", 3))
    write(shards / "part-00.jsonl.gz", rows("a", 2))
    write(shards / "part-02.parquet", rows("c", 2))
    ids = [r.id for r in iter_corpus(str(shards / "part-*"))]
    assert ids == ["a0", "a1", "b0", "b1", "b2", "c0", "c1"]
    listed = [shards / "part-02.parquet", str(shards / "part-00.*")]
    assert [r.id for r in iter_corpus(listed)] == ["c0", "c1", "a0", "a1"]
    # a shard named twice (by the list and by a glob) is read once
    assert expand_pool([shards / "part-00.jsonl.gz", str(shards / "*.gz")]) == [
        shards / "part-00.jsonl.gz"
    ]


def test_a_duplicate_across_shards_names_both_places(tmp_path):
    first = write(tmp_path / "a.jsonl.gz", rows("x", 3))
    second = write(tmp_path / "b.parquet", [*rows("y", 2), rows("x", 2)[1]])
    with pytest.raises(DataError) as e:
        list(iter_corpus([first, second]))
    assert str(e.value) == f"{second}:3: duplicate id 'x1' (first at {first}:2)"
    skipped = list(iter_corpus([first, second], on_bad_row="skip"))
    assert [r.id for r in skipped] == ["x0", "x1", "x2", "y0", "y1"]


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        ("bad.jsonl.gz", b"this is not gzip", r"not a readable gzip file"),
        ("bad.jsonl.zst", b"this is not zstd", r"not a readable zstd file"),
        ("bad.parquet", b"this is not parquet", r"not a readable Parquet file"),
    ],
)
def test_an_unreadable_shard_is_named(tmp_path, name, payload, message):
    good = write(tmp_path / "good.jsonl", rows("g", 2))
    bad = tmp_path / name
    bad.write_bytes(payload)
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}: {message}"):
        list(iter_corpus([good, bad]))


def test_a_truncated_gzip_is_named_with_the_last_line_read(tmp_path):
    whole = gzip.compress(jsonl_bytes(rows("t", 200)))
    bad = tmp_path / "cut.jsonl.gz"
    bad.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}: not a readable gzip file"):
        list(iter_corpus(bad))


def test_a_bad_line_inside_a_compressed_shard_names_file_and_line(tmp_path):
    data = jsonl_bytes(rows("z", 2)) + b"{not json\n"
    path = tmp_path / "z.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: not valid JSON"):
        list(iter_corpus(path))


def test_names_that_name_nothing_are_errors(tmp_path):
    with pytest.raises(DataError, match="glob .* matches no file"):
        list(iter_corpus(str(tmp_path / "none-*.jsonl")))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="is a folder but not a saved Hugging Face dataset"):
        list(iter_corpus(tmp_path / "plain"))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_corpus([tmp_path / "missing.jsonl"]))


def test_tokenizing_a_sharded_pool_is_all_or_nothing(tmp_path):
    good = write(tmp_path / "a.jsonl.gz", rows("a", 20))
    tok = train_bpe((r["text"] for r in rows("a", 20)), 300, tmp_path / "tok")
    corpus = tokenize_corpus(
        [good, write(tmp_path / "b.parquet", rows("b", 5))], tok, tmp_path / "ok"
    )
    assert len(corpus) == 25 and corpus.ids[20] == "b0"
    bad = tmp_path / "c.jsonl.zst"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable zstd file"):
        tokenize_corpus([good, bad], tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing that looks complete


def test_the_config_takes_a_glob_or_a_list_resolved_against_the_base(tmp_path):
    base = {"reference": "ref.jsonl", "heldout": "held.jsonl"}
    cfg = config_from_dict({"data": {**base, "pool": "shards/*.jsonl.zst"}}, base_dir=tmp_path)
    assert cfg.data.pool == tmp_path / "shards" / "*.jsonl.zst"
    cfg = config_from_dict(
        {"data": {**base, "pool": ["a.jsonl", "/abs/b.parquet"]}}, base_dir=tmp_path
    )
    assert cfg.data.pool == [tmp_path / "a.jsonl", Path("/abs/b.parquet")]
