"""Corpus, tokenization, reference sets and the demo data builder."""
