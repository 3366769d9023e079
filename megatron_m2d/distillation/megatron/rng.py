"""Every random generator a training step draws from, captured as JSON and restored exactly.

Megatron-LM pickles these states into a ShardedObject; a checkpoint is a user path and we never unpickle one, so
each rank writes its own small JSON file instead: Python's `random`, NumPy's global generator, torch's CPU
generator, the CUDA generators when CUDA is present, and megatron-core's CUDA RNG tracker (the per-TP-rank
dropout streams) when it has states. Byte states are base64; every value round-trips bit for bit.
"""

from __future__ import annotations

import base64
import random

import numpy as np
import torch

from megatron_m2d.errors import M2DError


def _bytes(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _tracker():
    """megatron-core's CUDA RNG tracker, or None where megatron-core is absent."""
    try:
        from megatron.core import tensor_parallel
    except ImportError:
        return None
    return tensor_parallel.get_cuda_rng_tracker()


def capture() -> dict:
    """This process's generator states, JSON-serialisable."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _bytes(torch.get_rng_state()),
             "cuda": [_bytes(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
             "tracker": None}
    tracker = _tracker()
    if tracker is not None and tracker.get_states():
        state["tracker"] = {name: _bytes(s.get_state() if isinstance(s, torch.Generator) else s)
                            for name, s in tracker.get_states().items()}
    return state


def restore(state: dict) -> None:
    """Set every generator `capture` recorded. A state for CUDA on a machine without it is an error: the
    continuation would not be the one the checkpoint describes."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(_tensor(state["torch"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise M2DError(f"malformed RNG state ({e})") from None
    if state.get("cuda") is not None:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(state["cuda"]):
            raise M2DError(f"the checkpoint holds {len(state['cuda'])} CUDA RNG states; this process sees "
                           f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA devices")
        torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])
    if state.get("tracker"):
        tracker = _tracker()
        current = tracker.get_states()
        restored = {}
        for name, text in state["tracker"].items():
            if isinstance(current.get(name), torch.Generator):  # CUDA-graph-safe trackers keep generators
                current[name].set_state(_tensor(text))
                restored[name] = current[name]
            else:
                restored[name] = _tensor(text)
        tracker.set_states(restored)
