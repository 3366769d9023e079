"""`m2d calibrate`: embeddings first, then each decoder layer loaded, run over all calibration hidden states,
statistics accumulated, hidden states passed on, layer freed. Peak memory: one decoder layer plus the
calibration activations.

Work happens in a `.NAME.partial` sibling of the output. After each layer its statistics and the hidden states
are saved there, so a killed run started again with the same arguments continues from the last finished layer.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from megatron_m2d import __version__
from megatron_m2d.calibration.statistics import MoEStatistics
from megatron_m2d.calibration.store import (FORMAT_VERSION, META, Statistics, check_finite, layer_file,
                                             model_fingerprint)
from megatron_m2d.calibration.streaming import LayerStreamer
from megatron_m2d.data.text import token_blocks
from megatron_m2d.errors import M2DError
from megatron_m2d.families import family_of
from megatron_m2d.io.checkpoint import Checkpoint, load_tokenizer
from megatron_m2d.io.writer import check_output_path, ordinary_permissions, remove, write_json

HIDDEN = "hidden.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise M2DError(f"--device {device} asked for, but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":  # CPUs are slow and inexact in bf16; GPUs are made for it
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise M2DError(f"unknown --dtype {dtype} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def calibrate(model: str | Path, data: str, out: str | Path, tokens: int = 65536, seq_len: int = 512,
              batch_size: int = 8, gram: bool = False, device: str = "auto", dtype: str = "auto", seed: int = 0,
              overwrite: bool = False, progress: bool = True, reuse: bool = False) -> Statistics:
    """Record the routing statistics of every MoE layer of `model` over `tokens` tokens of `data`. With `reuse`,
    finished statistics of the same request already at `out` are returned as they are."""
    out = check_output_path(out, overwrite, [("--model", model), ("--data", data)])
    ckpt = Checkpoint(model)
    family = family_of(ckpt.config)
    family.check_experts(ckpt)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    blocks = token_blocks(load_tokenizer(ckpt.path), data, tokens, seq_len, seed)
    config = ckpt.config
    run = {
        "format_version": FORMAT_VERSION, "m2d_version": __version__, "model": str(Path(model).resolve()),
        "model_type": config.model_type, "model_fingerprint": model_fingerprint(ckpt, family),
        "data": str(data), "tokens": int(blocks.numel()), "tokens_requested": tokens, "seq_len": seq_len,
        "seed": seed, "gram": gram, "dtype": str(torch_dtype).removeprefix("torch."),
        "num_layers": config.num_hidden_layers, "moe_layers": family.moe_layers(config),
        "num_experts": family.num_experts(config), "top_k": family.top_k(config),
        "renormalizes": family.renormalizes(config), "routed_scaling": family.routed_scaling(config),
    }
    if reuse and _same_request(out, run, complete=True):
        return Statistics(out)
    work = out.parent / f".{out.name}.partial"
    try:
        _run_layers(ckpt, family, blocks, batch_size, device, torch_dtype, gram, run, work, progress)
    except Exception:  # a refused or failed run leaves nothing; a killed one keeps `work` to resume from
        shutil.rmtree(work, ignore_errors=True)
        raise
    remove(out)
    os.replace(work, out)
    if progress:
        meta = json.loads((out / META).read_text())
        layers_done = meta["layers_run"]
        rate = run["tokens"] * layers_done / config.num_hidden_layers / max(meta["seconds"], 1e-9)
        print(f"calibrated {run['tokens']} tokens through {layers_done} layers in {meta['seconds']:.1f} s "
              f"({rate:,.0f} tokens/s) -> {out}")
    return Statistics(out)


def _run_layers(ckpt, family, blocks, batch_size, device, torch_dtype, gram, run, work: Path, progress) -> None:
    config = ckpt.config
    start_layer, hidden = _resume(work, run)
    if start_layer == 0:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        write_json(work / META, {**run, "complete": False})

    streamer = LayerStreamer(ckpt, family, device, torch_dtype)
    embedded, kwargs = streamer.prepare(blocks, batch_size)
    hidden = embedded if hidden is None else [h.to(device=device, dtype=torch_dtype) for h in hidden]
    moe_layers = set(run["moe_layers"])
    started = time.perf_counter()
    bar = tqdm(range(start_layer, config.num_hidden_layers), desc="calibrate", unit="layer", disable=not progress,
               initial=start_layer, total=config.num_hidden_layers)
    for index in bar:
        bar.set_postfix(layer=index)
        layer = streamer.load_layer(index)
        stats = None
        if index in moe_layers:
            stats = MoEStatistics(run["num_experts"], config.hidden_size, run["top_k"], gram,
                                  shared_gate=family.shared.gate if family.shared else None)
            hook = layer.mlp.register_forward_pre_hook(
                lambda module, args: stats.update(module, args[0], family.route))
        streamer.forward_layer(layer, index, hidden, kwargs)
        if stats is not None:
            hook.remove()
            check_finite(stats.sums, index, ckpt.path)
            save_file(stats.sums, work / layer_file(index))
        del layer
        _checkpoint_hidden(work, hidden, index + 1)
    elapsed = time.perf_counter() - started
    (work / HIDDEN).unlink(missing_ok=True)
    write_json(work / META, {**run, "complete": True, "seconds": round(elapsed, 2),
                             "layers_run": config.num_hidden_layers - start_layer})


def _checkpoint_hidden(work: Path, hidden: list[torch.Tensor], next_layer: int) -> None:
    tmp = work / (HIDDEN + ".tmp")
    save_file({f"batch_{b}": h.contiguous().cpu() for b, h in enumerate(hidden)}, tmp,
              metadata={"next_layer": str(next_layer)})
    os.replace(tmp, work / HIDDEN)


def _same_request(directory: Path, run: dict, complete: bool) -> bool:
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and bool(meta.get("complete")) == complete and \
        all(meta.get(key) == value for key, value in run.items())


def _resume(work: Path, run: dict) -> tuple[int, list[torch.Tensor] | None]:
    """(first layer to run, saved hidden states) when `work` holds an unfinished run of the same request."""
    if not _same_request(work, run, complete=False):
        return 0, None
    try:
        from safetensors import safe_open

        with safe_open(work / HIDDEN, framework="pt") as handle:
            next_layer = int(handle.metadata()["next_layer"])
        saved = load_file(work / HIDDEN)
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return 0, None
    hidden = [saved[f"batch_{b}"] for b in range(len(saved))]
    print(f"resuming calibration in {work} at layer {next_layer}")
    return next_layer, hidden
