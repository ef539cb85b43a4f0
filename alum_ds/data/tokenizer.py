"""Byte-level BPE tokenizers with RoBERTa's special tokens: learn one, or load a local folder."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, RobertaTokenizerFast

from alum_ds.data.shards import DataError

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def learn_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Learn a byte-level BPE (RoBERTa's scheme: ids 0-4 are <s> <pad> </s> <unk> <mask>)."""
    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=True)
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    vocab = bpe.get_vocab()
    merges = _merges(bpe)
    # transformers 5 takes vocab=/merges= (vocab_file= is silently ignored; see DESIGN.md).
    tok = RobertaTokenizerFast(vocab=vocab, merges=merges)
    if len(tok) != len(vocab):
        raise DataError(
            f"tokenizer construction lost tokens ({len(tok)} of {len(vocab)}): "
            "incompatible transformers version"
        )
    return tok


def _merges(bpe: ByteLevelBPETokenizer) -> list[tuple[str, str]]:
    import json

    model = json.loads(bpe._tokenizer.to_str())["model"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a local tokenizer folder; refuse one without RoBERTa's special tokens."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"tokenizer folder {p} not found")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"tokenizer folder {p} does not load: {str(e).splitlines()[0]}") from None
    for name in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tok, name, None) is None:
            raise DataError(f"tokenizer in {p} has no {name.removesuffix('_id')}; a RoBERTa-style "
                            "tokenizer (<s> <pad> </s> <mask>) is required")
    return tok
