"""Evaluation: zero-shot classification, linear probing, fine-tuning and their metrics."""
