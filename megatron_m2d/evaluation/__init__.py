"""Stage 5: evaluation of HF outputs (perplexity here; lm-eval tasks build on it)."""
