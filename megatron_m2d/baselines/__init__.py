"""Baselines: dense-to-dense width pruning (D2D) and a random dense FFN."""
