"""Tokenizers: any Hugging Face tokenizer directory, or a byte-level BPE trained on the pool."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mates.artifacts import atomic_path
from mates.errors import ConfigError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on `texts` and save it as a loadable tokenizer directory."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS
    )
    with atomic_path(out_dir) as tmp:
        tok.save_pretrained(tmp)
    log.info("trained byte-level BPE with %d tokens -> %s", len(tok), out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory offline; it must define an EOS token."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"`data.tokenizer`: {path} is not a tokenizer directory")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.eos_token_id is None:
        raise ConfigError(f"`data.tokenizer`: tokenizer at {path} has no EOS token")
    return tok
