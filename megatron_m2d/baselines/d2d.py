"""`m2d d2d`: dense-to-dense width pruning of a dense teacher (the paper's D2D baseline, Minitron-style).

Neuron importance is activation-based, as in Minitron (Muralidharan et al., 2024), aggregated as
nvidia-modelopt's `mcore_minitron` does (its `_register_mlp_importance`): for every FFN neuron j of a layer, the
mean of |h_j| over each calibration sequence, then the L2 norm over sequences, where h = act(gate x) * up x is the
input of down_proj (`--importance minitron`, the default). `--importance mean` is the plain mean of |h_j| over all
tokens. modelopt's own estimator hooks Megatron-Core modules only, and this baseline prunes a HF checkpoint
streamed a layer at a time, so the same aggregation is written here (a few lines).
Each layer keeps its `width` most important neurons (in their original order): gate/up rows and down columns.
Calibration streams the teacher one layer at a time, like `m2d calibrate`, so any size fits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from megatron_m2d.calibration.run import resolve_device, resolve_dtype
from megatron_m2d.calibration.streaming import LayerStreamer
from megatron_m2d.data.text import token_blocks
from megatron_m2d.errors import M2DError
from megatron_m2d.families import FAMILIES
from megatron_m2d.families.base import LAYERS
from megatron_m2d.io.checkpoint import Checkpoint, load_tokenizer
from megatron_m2d.io.model_card import new_card, public_name, table, write_card
from megatron_m2d.io.writer import ShardedWriter, atomic_directory, check_output_path, copy_side_files, write_json

FFN = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


IMPORTANCE = ("minitron", "mean")
IMPORTANCE_RULES = {
    "minitron": "L2 norm over sequences of the per-sequence mean |act(gate x) * up x| (Minitron, modelopt)",
    "mean": "mean |act(gate x) * up x| over all tokens",
}


def neuron_importance(ckpt: Checkpoint, blocks: torch.Tensor, batch_size: int, device: str, dtype: torch.dtype,
                      progress: bool, aggregation: str = "minitron") -> dict[int, torch.Tensor]:
    """Per layer, [intermediate]: minitron = sqrt(sum over sequences of (mean over the sequence of |h|)^2);
    mean = mean of |h| over all tokens (h: the input of down_proj)."""
    if aggregation not in IMPORTANCE:
        raise M2DError(f"unknown --importance {aggregation!r} (choose from {', '.join(IMPORTANCE)})")
    streamer = LayerStreamer(ckpt, None, device, dtype)
    hidden, kwargs = streamer.prepare(list(blocks.split(batch_size)))
    importance = {}
    for index in tqdm(range(ckpt.config.num_hidden_layers), desc="d2d importance", unit="layer",
                      disable=not progress):
        layer = streamer.load_layer(index)
        total = torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64)

        def accumulate(module, args):
            magnitude = args[0].double().abs()  # [batch, sequence, intermediate]
            if aggregation == "minitron":
                total.add_(magnitude.mean(dim=1).pow(2).sum(0).cpu())
            else:
                total.add_(magnitude.reshape(-1, magnitude.shape[-1]).sum(0).cpu())

        hook = layer.mlp.down_proj.register_forward_pre_hook(accumulate)
        streamer.forward_layer(layer, index, hidden, kwargs)
        hook.remove()
        importance[index] = total.sqrt() if aggregation == "minitron" else total / blocks.numel()
        del layer
    return importance


def parameter_count(config) -> int:
    """Parameters of a HF model of this config, counted on the meta device (no memory, any size)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def matched_width(dense_config, target_params: int, multiple: int = 64) -> int:
    """The FFN width, a multiple of `multiple` (so it splits over tensor-parallel ranks), at which the dense
    model's parameter count comes closest to `target_params` (D2D at the student's size). The count is linear
    in the width, so two counts give it exactly."""
    import copy

    full = dense_config.intermediate_size
    narrower = copy.deepcopy(dense_config)
    narrower.intermediate_size = full - multiple
    per_unit = (parameter_count(dense_config) - parameter_count(narrower)) / multiple
    width = round((full - (parameter_count(dense_config) - target_params) / per_unit) / multiple) * multiple
    if not multiple <= width <= full:
        raise M2DError(f"no FFN width of this dense model gives {target_params / 1e9:.3g} B parameters (its "
                       f"other parts alone hold {(parameter_count(dense_config) - per_unit * full) / 1e9:.3g} B): "
                       "pick a smaller dense teacher")
    return width


def d2d(model: str | Path, data: str, out: str | Path, width: int, tokens: int = 65536, seq_len: int = 512,
        batch_size: int = 8, device: str = "auto", dtype: str = "auto", seed: int = 0, overwrite: bool = False,
        progress: bool = True, importance: str = "minitron") -> Path:
    out = check_output_path(out, overwrite, [("--model", model), ("--data", data)])
    ckpt = Checkpoint(model)
    config = ckpt.config
    if config.model_type in FAMILIES:
        raise M2DError(f"{model} is a {config.model_type} MoE: d2d prunes dense models; use `m2d densify`")
    full = getattr(config, "intermediate_size", None)
    if not isinstance(full, int) or not ckpt.has(f"{LAYERS}.0.{FFN[2]}"):
        raise M2DError(f"{model} has no gate/up/down SwiGLU FFN that d2d knows how to prune")
    if importance not in IMPORTANCE:
        raise M2DError(f"unknown --importance {importance!r} (choose from {', '.join(IMPORTANCE)})")
    if not 1 <= width <= full:
        raise M2DError(f"--width must lie in [1, {full}] (the teacher's intermediate size)")
    device = resolve_device(device)
    blocks = token_blocks(load_tokenizer(ckpt.path), data, tokens, seq_len, seed)
    scores = neuron_importance(ckpt, blocks, batch_size, device, resolve_dtype(dtype, device), progress, importance)
    kept = {layer: torch.sort(torch.topk(score, width).indices).values for layer, score in scores.items()}
    with atomic_directory(out, overwrite) as tmp:
        writer = ShardedWriter(tmp)
        for key in ckpt.keys():
            tensor = ckpt.get(key)
            parts = key.split(".")
            if key.startswith(LAYERS + ".") and ".".join(parts[3:]) in FFN:
                rows = kept[int(parts[2])]
                tensor = tensor[:, rows] if key.endswith("down_proj.weight") else tensor[rows]
            writer.add(key, tensor.contiguous())
        writer.close()
        ckpt.release()
        target = ckpt.config
        target.intermediate_size = width
        target.save_pretrained(tmp)
        copy_side_files(ckpt.path, tmp)
        write_json(tmp / "m2d_d2d.json", {
            "teacher": public_name(model), "teacher_path": str(Path(model).resolve()), "data": data,
            "tokens": int(blocks.numel()), "width": width, "teacher_width": full,
            "importance": importance, "importance_rule": IMPORTANCE_RULES[importance],
            "kept": {str(k): v.tolist() for k, v in kept.items()}})
        method = {"importance of an FFN neuron": f"`{importance}`: {IMPORTANCE_RULES[importance]}",
                  "neurons kept per layer": f"{width} of {full}, in their original order",
                  "calibration": f"{blocks.numel():,} tokens of `{public_name(data)}`, sequences of {seq_len}, "
                                 f"seed {seed}"}
        write_card(tmp, new_card(
            teacher=model, teacher_dir=model, model_dir=tmp, name=out.name,
            title=f"D2D baseline of {public_name(model)}",
            summary=(f"The dense-to-dense (D2D) baseline: the dense model `{public_name(model)}` with every FFN "
                     f"pruned from {full} to its {width} most important neurons by activation importance. "
                     "Attention, embeddings and norms are the teacher's. It is the width-pruning "
                     "baseline a densified MoE student of the same FFN width is compared with."),
            facts={"class": f"`{config.architectures[0]}`" if config.architectures else config.model_type,
                   "FFN width": width, "teacher": f"`{public_name(model)}`",
                   "size": f"{writer.total_bytes / 1e6:,.1f} MB"},
            made=[("How it was made", table(method, ("method", "setting")))], tags=["pruning", "baseline"]))
    if progress:
        print(f"pruned FFN width {full} -> {width} -> {out}")
    return out
