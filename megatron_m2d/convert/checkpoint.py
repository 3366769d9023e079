"""A dense student or a MoE teacher between a HF directory and a Megatron-Core distributed checkpoint.

The Megatron side is `megatron.core.dist_checkpointing` (global tensors with sharding metadata, so a checkpoint
loads under other parallel sizes), plus `m2d_convert.json` with the HF config, which is what builds the matching
Megatron model again (`build_gpt_model`). This version converts at tensor and pipeline parallel size 1 in one
process; it needs an initialised torch.distributed group (it makes a single-process gloo group if there is none).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from megatron_m2d.convert import dense_mapping, moe_mapping
from megatron_m2d.convert.megatron_model import build_gpt_model
from megatron_m2d.errors import M2DError
from megatron_m2d.io.checkpoint import Checkpoint
from megatron_m2d.io.writer import ShardedWriter, atomic_directory, check_output_path, copy_side_files, write_json

META = "m2d_convert.json"


def mapping_for(config):
    """The mapping module of a model type: MoE teachers and dense students share one interface."""
    return moe_mapping if config.model_type in moe_mapping.DENSE_TWIN or config.model_type in moe_mapping.REFUSED \
        else dense_mapping


def _ensure_parallel_state(tp: int, pp: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if tp != 1 or pp != 1:
        raise M2DError("this version converts at --tp 1 --pp 1; the checkpoint it writes loads under other "
                       "sizes with Megatron's resharding, but writing them directly is not supported yet")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, pp)


def hf_to_megatron_checkpoint(model: str | Path, out: str | Path, tp: int = 1, pp: int = 1,
                              overwrite: bool = False) -> Path:
    from megatron.core import dist_checkpointing

    out = check_output_path(out, overwrite)
    ckpt = Checkpoint(model)
    if not torch.cuda.is_available() and not os.environ.get("M2D_ALLOW_CPU_CHECKPOINT_WRITE"):
        # megatron-core's distributed-checkpoint writer (0.16.1) calls torch.cuda.synchronize() after copying
        # tensors to host memory, which fails without CUDA; our CPU tests patch that call, the product does not.
        raise M2DError("writing a Megatron-Core distributed checkpoint needs a CUDA device (megatron-core's "
                       "writer synchronises CUDA); run hf-to-megatron on a GPU machine")
    _ensure_parallel_state(tp, pp)
    mapping = mapping_for(ckpt.config)
    hf_state = {key: ckpt.get(key) for key in ckpt.keys()}
    megatron = build_gpt_model(ckpt.config, params_dtype=ckpt.dtype())
    missing, unexpected = megatron.load_state_dict(mapping.hf_to_megatron(hf_state, ckpt.config), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise M2DError(f"internal error: mapping mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with atomic_directory(out, overwrite) as tmp:
        dist_checkpointing.save(megatron.sharded_state_dict(), str(tmp))
        write_json(tmp / META, {"hf_config": ckpt.config.to_dict(), "tp": tp, "pp": pp,
                                "dtype": str(ckpt.dtype()).removeprefix("torch."), "source": str(Path(model).resolve())})
        side = tmp / "hf_side_files"
        side.mkdir()
        copy_side_files(ckpt.path, side)
    return out


def megatron_to_hf_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    from megatron.core import dist_checkpointing

    checkpoint, out = Path(checkpoint), check_output_path(out, overwrite)
    try:
        meta = json.loads((checkpoint / META).read_text())
    except (OSError, json.JSONDecodeError):
        raise M2DError(f"{checkpoint} is not a checkpoint written by `m2d convert hf-to-megatron` (no {META})") from None
    values = dict(meta["hf_config"])
    config: PretrainedConfig = AutoConfig.for_model(values.pop("model_type"), **values)
    dtype = getattr(torch, meta["dtype"])
    _ensure_parallel_state(1, 1)
    megatron = build_gpt_model(config, params_dtype=dtype)
    state = dist_checkpointing.load(megatron.sharded_state_dict(), str(checkpoint))
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
    with atomic_directory(out, overwrite) as tmp:
        writer = ShardedWriter(tmp)
        for name, tensor in mapping_for(config).megatron_to_hf(tensors, config).items():
            writer.add(name, tensor.to(dtype))
        writer.close()
        config.save_pretrained(tmp)
        copy_side_files(checkpoint / "hf_side_files", tmp)
    return out
