"""What a pretrained model has learned, in words: held-out sentences with one word masked, and
the model's top fill-ins beside the true word.

The examples come from the validation split of the run's own data (documents no step trained
on), and the model is asked through transformers' fill-mask pipeline on an exported folder: the
path a user takes after ``alum-ds export``. A model of token frequencies alone answers the same
words for every sentence; one that has learned context does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alum_ds.data.shards import open_split

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_PLAIN_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[,;:]?$")
_CANDIDATE = re.compile(r"^[a-z]{3,}$")
# Words every model of frequencies guesses: masking one shows little.
_COMMON = frozenset("the and for that with are this not was can its has have from but".split())


@dataclass(frozen=True)
class Example:
    text: str
    """The sentence with the tokenizer's mask token in place of ``word``."""
    word: str


def masked_examples(data_dir: str | Path, tokenizer: Any, n: int = 3, *, max_documents: int = 400,
                    seq_len: int = 512) -> list[Example]:
    """Up to ``n`` prose sentences (8 to 30 plain words, ending in a full stop, at most
    ``seq_len`` tokens with <s> and </s>: what the model was trained on) from different
    validation documents, each with its middle-most lower-case word that is one token of
    ``tokenizer`` replaced by the mask token. Deterministic for a prepared folder."""
    out: list[Example] = []
    for shard in open_split(data_dir, "validation"):
        for d in range(min(shard.offsets.size - 1, max_documents)):
            ids = shard.tokens[shard.offsets[d]: shard.offsets[d + 1]]
            example = _from_document(tokenizer.decode(ids.tolist()), tokenizer, seq_len)
            if example is not None:
                out.append(example)
                if len(out) == n:
                    return out
    return out


def _from_document(text: str, tokenizer: Any, seq_len: int) -> Example | None:
    for sentence in _SENTENCE.split(" ".join(text.split())):
        words = sentence.split(" ")
        if not (8 <= len(words) <= 30 and sentence.endswith(".") and sentence[0].isupper()):
            continue
        if not all(_PLAIN_WORD.match(w.rstrip(".")) for w in words):
            continue
        # Tokenized only once the cheap tests pass: longer than anything the model saw is out.
        if len(tokenizer(sentence)["input_ids"]) > seq_len:
            continue
        middle = len(words) // 2
        for i in sorted(range(1, len(words) - 1), key=lambda i: abs(i - middle)):
            w = words[i]
            if _CANDIDATE.match(w) and w not in _COMMON and len(tokenizer.tokenize(" " + w)) == 1:
                masked = " ".join([*words[:i], tokenizer.mask_token, *words[i + 1:]])
                return Example(masked, w)
    return None


def fill_mask(model_dir: str | Path, examples: list[Example], top_k: int = 3,
              token_probs: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The fill-mask pipeline's ``top_k`` answers for each example (on the CPU), and the
    probability it gives the true word (``p_true``). With ``token_probs`` (a model of token
    frequencies alone, indexed by token id) also that model's probability of the true word
    (``p_frequency``): a model that has learned context gives the true word more than its
    frequency even where its top answers are still frequent words."""
    from transformers import logging, pipeline

    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a bar for loading a few tensors would bury the answers
    try:
        fill = pipeline("fill-mask", model=str(model_dir), tokenizer=str(model_dir), device="cpu")
    finally:
        if bar:
            logging.enable_progress_bar()
    out = []
    for e in examples:
        # The word as the one vocabulary entry it is after a space (checked in _from_document).
        (token,) = fill.tokenizer.tokenize(" " + e.word)
        r = {"text": e.text, "word": e.word,
             "top": [(g["token_str"].strip() or g["token_str"], round(float(g["score"]), 4))
                     for g in fill(e.text, top_k=top_k)],
             "p_true": float(fill(e.text, targets=[token])[0]["score"])}
        if token_probs is not None:
            r["p_frequency"] = float(token_probs[fill.tokenizer.convert_tokens_to_ids(token)])
        out.append(r)
    return out


def lines(results: list[dict[str, Any]]) -> list[str]:
    """One line per example: the sentence, the true word (with the model's and the frequency
    model's probability of it, where known), the model's guesses."""
    out = []
    for r in results:
        true = repr(r["word"])
        if "p_true" in r and "p_frequency" in r:
            true += (f" (the model: {100 * r['p_true']:.2g}%, {r['p_true'] / r['p_frequency']:.3g} times "
                     f"its frequency, {100 * r['p_frequency']:.2g}%)")
        elif "p_true" in r:
            true += f" (the model: {100 * r['p_true']:.2g}%)"
        out.append(f"  {r['text']}\n    true: {true}; model: "
                   + ", ".join(f"{w!r} {p:.2f}" for w, p in r["top"]))
    return out
