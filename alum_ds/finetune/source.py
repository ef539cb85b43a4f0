"""Where the pretrained weights come from, and the classifier built on them.

``task.checkpoint`` is a Hugging Face folder (``alum-ds export`` output, or any local folder of a
family ``alum_ds.arch`` supports, with a tokenizer), a Hub id ``ORG/NAME[@REVISION]`` (resolved by
``alum_ds.hub``; a local folder of that name wins), an alum-ds run folder, its checkpoints/
folder, or one of its checkpoint folders. ``task.tokenizer`` is a folder or a Hub id too.
DeepSpeed checkpoints
are consolidated to fp32 with ``alum_ds.export`` into a private temporary folder per process (no
rank waits for another, and no shared file is written); the folder is removed once the model is
built. DeepSpeed checkpoints are pickles: fine-tune only from your own runs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alum_ds.data.shards import DataError


@dataclass
class ModelSource:
    folder: Path
    """A Hugging Face model folder (config.json + weights)."""
    tokenizer_dir: Path
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    temporary: Path | None = None
    """A temporary folder to remove once the model is built."""
    max_positions: int | None = None
    """Longest sequence the model's position table holds (None: no limit)."""
    hub: dict[str, Any] = field(default_factory=dict)
    """The Hub commits read, by option (``alum_ds.hub.Folder.record``), for results.json."""
    tokenizer_note: str = ""
    """For the run's banner: where a Hub ``task.tokenizer`` came from ('' otherwise)."""

    def cleanup(self) -> None:
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)


def _is_deepspeed(p: Path) -> bool:
    """A run folder, its checkpoints/ folder, or a checkpoint folder (what ``alum_ds.export``
    accepts)."""
    return (p / "checkpoints").is_dir() or (p / "latest").is_file() or (p.is_dir() and (
        p.parent.name == "checkpoints" or (p.parent / "latest").is_file() or p.name.startswith("step")))


def resolve_source(checkpoint: str, tokenizer: str = "") -> ModelSource:
    """A ModelSource for ``checkpoint``; raise DataError (one line) when it is none of the three."""
    from alum_ds import hub

    found = hub.resolve(checkpoint, "task.checkpoint", kind="folder")
    tok = (hub.resolve(tokenizer, "task.tokenizer", kind="tokenizer folder", weights=False)
           if tokenizer else None)
    records = {o: f.record() for o, f in (("task.checkpoint", found), ("task.tokenizer", tok))
               if f is not None and f.from_hub}
    p = found.path
    if not p.exists():
        raise DataError(f"task.checkpoint {checkpoint}: no such folder (give an alum-ds run folder, a "
                        "checkpoint folder, an exported Hugging Face folder or a Hub id ORG/NAME)")
    tok_dir = tok.path if tok is not None else None
    tok_words = f", tokenizer from {tok.describe()}" if tok is not None and tok.from_hub else ""
    if (p / "config.json").is_file():
        what = found.describe() if found.from_hub else f"Hugging Face folder {p}"
        src = ModelSource(p, tok_dir or p, what, hub=records, tokenizer_note=tok_words)
    elif _is_deepspeed(p):
        from alum_ds.export import export

        tmp = Path(tempfile.mkdtemp(prefix="alum_ds_finetune_"))
        try:
            out = export(str(p), str(tmp / "model"))
        except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"task.checkpoint {checkpoint}: cannot read the DeepSpeed checkpoint: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        src = ModelSource(out, tok_dir or out, f"DeepSpeed checkpoint {p} (consolidated to fp32)",
                          temporary=tmp, hub=records, tokenizer_note=tok_words)
    else:
        raise DataError(f"task.checkpoint {checkpoint} is neither a Hugging Face model folder "
                        "(config.json) nor an alum-ds run or checkpoint folder")
    try:
        try:
            src.config = json.loads((src.folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{src.folder / 'config.json'} does not load: {e}") from None
        from alum_ds.arch import adapter_for

        try:
            adapter = adapter_for(src.config, where=f"task.checkpoint {checkpoint}")
        except ValueError as e:
            raise DataError(str(e)) from None
        if "max_position_embeddings" in src.config:
            from transformers import AutoConfig

            src.max_positions = adapter.max_positions(AutoConfig.from_pretrained(str(src.folder)))
    except DataError:
        src.cleanup()
        raise
    return src


def load_checked_tokenizer(src: ModelSource) -> Any:
    """The tokenizer, refused unless it matches the model's vocabulary and padding id."""
    from alum_ds.data.tokenizer import load_tokenizer

    if not (src.tokenizer_dir / "tokenizer.json").is_file() and not (
        src.tokenizer_dir / "tokenizer_config.json"
    ).is_file():
        raise DataError(f"{src.tokenizer_dir} holds no tokenizer: set task.tokenizer=DIR (the tokenizer "
                        "the model was pretrained with)")
    tok = load_tokenizer(src.tokenizer_dir)
    vocab = int(src.config.get("vocab_size", -1))
    if len(tok) != vocab:
        raise DataError(f"{src.description} has a vocabulary of {vocab} tokens but the tokenizer in "
                        f"{src.tokenizer_dir} has {len(tok)}: fine-tune with the tokenizer the model "
                        "was pretrained with")
    pad = src.config.get("pad_token_id")
    if pad is not None and tok.pad_token_id != pad:
        raise DataError(f"the tokenizer in {src.tokenizer_dir} pads with id {tok.pad_token_id} but "
                        f"{src.description} with {pad}: they do not belong together")
    return tok


def build_classifier(src: ModelSource, labels: list[str], *, dropout: float,
                     activation_checkpointing: bool = False) -> Any:
    """The family's ``AutoModelForSequenceClassification`` with the pretrained encoder and a
    fresh classifier head (or the folder's own head when it was fine-tuned on the same labels);
    the backbone's dropout set under the family's names."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    from alum_ds.arch import adapter_for

    same_head = src.config.get("id2label") and [
        src.config["id2label"][str(i)] for i in range(len(src.config["id2label"]))
    ] == labels
    verbosity = transformers.logging.get_verbosity()
    # "Some weights were not initialized" is the expected news for a new classification head.
    transformers.logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(src.folder),
            local_files_only=True,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
            ignore_mismatched_sizes=not same_head,
            **adapter_for(src.config).dropout_kwargs(dropout),
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    if activation_checkpointing:
        # Non-reentrant: reentrant checkpointing does not support the ascent's autograd.grad.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model
