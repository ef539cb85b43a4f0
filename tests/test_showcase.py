"""alum_ds/showcase.py: held-out sentences with one word masked, and fill-mask on a folder."""

from __future__ import annotations

from pathlib import Path

from alum_ds import showcase


def test_masked_examples_are_held_out_prose_with_one_single_token_word(cache_dir: Path) -> None:
    from alum_ds.data.prepare import ensure_embedded
    from alum_ds.data.shards import open_split
    from alum_ds.data.tokenizer import load_tokenizer

    data = ensure_embedded(cache_dir, vocab_size=2048, seed=1234)  # the main job's
    tok = load_tokenizer(data / "tokenizer")
    examples = showcase.masked_examples(data, tok, 3, seq_len=32)
    assert len(examples) == 3 and len({e.text for e in examples}) == 3
    assert examples == showcase.masked_examples(data, tok, 3, seq_len=32)  # deterministic
    # No longer than the sequences the model was trained on (its position table ends there).
    assert all(len(tok(e.text.replace(tok.mask_token, e.word))["input_ids"]) <= 32 for e in examples)
    validation = " ".join(tok.decode(s.tokens.tolist()) for s in open_split(data, "validation"))
    validation = " ".join(validation.split())
    for e in examples:
        assert e.text.count(tok.mask_token) == 1 and len(tok.tokenize(" " + e.word)) == 1
        assert e.text.replace(tok.mask_token, e.word) in validation  # a held-out sentence
    lines = showcase.lines([{"text": "a <mask> b.", "word": "x", "top": [("y", 0.5), ("z", 0.25)]}])
    assert lines == ["  a <mask> b.\n    true: 'x'; model: 'y' 0.50, 'z' 0.25"]
