"""megatron_m2d: turn a trained Mixture-of-Experts LM into a dense LM and distill it back to quality.

The Python API mirrors the CLI: `calibrate`, `densify`, `inspect_stats` take and return plain objects.
"""

__version__ = "0.1.0"
