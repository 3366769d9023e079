"""megatron_m2d: turn a trained Mixture-of-Experts LM into a dense LM and distill it back to quality.

The Python API mirrors the CLI, with functions that take and return plain objects:

    from megatron_m2d import calibrate, densify, inspect_stats
    stats = calibrate("Qwen3-30B-A3B", "calib.jsonl", "stats", tokens=262144, gram=True)
    result = densify("Qwen3-30B-A3B", "dense-3b", "gld_reap", select=8, stats="stats")
    result.plan["layers"]["0"]["selected"]
"""

__version__ = "0.1.0"

_API = {
    "calibrate": "megatron_m2d.calibration.run",
    "densify": "megatron_m2d.densification.run",
    "inspect_stats": "megatron_m2d.calibration.inspect",
    "Statistics": "megatron_m2d.calibration.store",
    "Method": "megatron_m2d.densification.plan",
    "KernelOptions": "megatron_m2d.densification.scoring",
    "perplexity_of_dir": "megatron_m2d.evaluation.perplexity",
}


def __getattr__(name):  # lazy: `import megatron_m2d` stays cheap, and the version is readable without torch
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'megatron_m2d' has no attribute {name!r}")


__all__ = ["__version__", *_API]
