"""Sequence-classification fine-tuning of pretrained (ALUM or plain) RoBERTa models, plainly or
with ALUM's regulariser on the classifier's output distribution, under the same DeepSpeed configs.

Modules: ``tasks`` (the embedded default task), ``data`` (files, columns, labels, batches),
``source`` (run/checkpoint/Hugging Face folder -> classifier), ``objective`` (cross-entropy +
ALUM, PGD), ``evaluate`` (accuracy, macro F1, robust accuracy), ``loop`` (the run), ``cli``.
"""
