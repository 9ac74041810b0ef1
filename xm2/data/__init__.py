"""Corpus reading, tokenizer training, token shards, the phase-switching data module, and the
evaluation sets (reading them, and `xm2 prepare-eval`)."""
