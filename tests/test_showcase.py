"""alum_ds/showcase.py: held-out sentences with one word masked, and fill-mask on a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    with_p = showcase.lines([{"text": "a <mask> b.", "word": "x", "top": [("y", 0.5)], "p_true": 0.03,
                              "p_frequency": 0.001}])
    assert with_p == ["  a <mask> b.\n    true: 'x' (the model: 3%, 30 times its frequency, 0.1%); "
                      "model: 'y' 0.50"]


def test_fill_mask_reports_the_models_probability_of_the_true_word(cache_dir: Path, tmp_path: Path) -> None:
    """p_true is the model's softmax at the masked position for the true word's token, as a
    direct forward computes it; p_frequency is the given frequency model's entry for that token."""
    import numpy as np
    import torch

    from alum_ds.data.prepare import ensure_embedded
    from alum_ds.data.tokenizer import load_tokenizer
    from alum_ds.model import build_model

    data = ensure_embedded(cache_dir, vocab_size=2048, seed=1234)
    tok = load_tokenizer(data / "tokenizer")
    torch.manual_seed(0)
    model = build_model(preset="tiny", vocab_size=len(tok), seq_len=32, dropout=0.0).eval()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    examples = showcase.masked_examples(data, tok, 2, seq_len=32)
    probs = np.random.default_rng(0).dirichlet(np.ones(len(tok)))
    results = showcase.fill_mask(folder, examples, token_probs=probs)
    for e, r in zip(examples, results):
        enc = tok(e.text, return_tensors="pt")
        at = int((enc["input_ids"][0] == tok.mask_token_id).nonzero())
        with torch.no_grad():
            p = model(**enc).logits[0, at].softmax(-1)
        word_id = tok.convert_tokens_to_ids(tok.tokenize(" " + e.word)[0])
        assert r["p_true"] == pytest.approx(float(p[word_id]), rel=1e-4)
        assert r["p_frequency"] == pytest.approx(float(probs[word_id]))
        assert len(r["top"]) == 3 and r["top"][0][1] == pytest.approx(float(p.max()), abs=1e-4)  # rounded
