"""Corpus reading, sentencepiece tokenizers and the grain pipeline."""
