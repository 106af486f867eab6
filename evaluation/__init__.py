"""Measuring a (pruned) model: perplexity, latency, size."""
