"""Evaluation and fine-tuning data (exo classic's `exo.train`)."""
