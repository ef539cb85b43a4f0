"""alum_ds: DeepSpeed-backed ALUM adversarial pretraining of RoBERTa-style masked LMs."""

__version__ = "0.1.0"
