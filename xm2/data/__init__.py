"""Corpus reading, tokenizer training, token shards and the phase-switching data module."""
