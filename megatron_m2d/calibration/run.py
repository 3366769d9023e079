"""`m2d calibrate`: embeddings first, then each decoder layer loaded, run over all calibration hidden states,
statistics recorded from that very forward (capture.py), hidden states passed on, layer freed. Peak memory: one
decoder layer plus the calibration activations.

Work happens in a `.NAME.partial` sibling of the output. After each layer its statistics and the hidden states
are saved there, so a killed run started again with the same arguments continues from the last finished layer.
Under torchrun the batches are split over the ranks and each layer's sums are added across them
(distributed.py); rank 0 writes the statistics.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from megatron_m2d import __version__
from megatron_m2d.calibration.capture import recording, use_recording_experts
from megatron_m2d.calibration.distributed import Ranks, join
from megatron_m2d.calibration.statistics import MoEStatistics
from megatron_m2d.calibration.store import (FORMAT_VERSION, META, Statistics, check_finite, layer_file,
                                             model_fingerprint)
from megatron_m2d.calibration.streaming import LayerStreamer, release_freed_heap
from megatron_m2d.data.text import token_blocks
from megatron_m2d.errors import M2DError
from megatron_m2d.families import family_of
from megatron_m2d.io.checkpoint import Checkpoint, load_tokenizer
from megatron_m2d.io.writer import check_output_path, remove, write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise M2DError(f"--device {device} asked for, but no CUDA device is available")
    return device


def fast_bf16(device: str) -> bool:
    """Whether the device multiplies bf16 natively (fp32 accumulation) and so faster than fp32: GPUs with bf16,
    CPUs with AVX512-BF16 or AMX. Without them a CPU emulates bf16 more slowly than it computes fp32."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto': bf16 where the device is fast at it (statistics stay within the bounds README states against
    fp32, and are summed in fp64), else fp32."""
    if dtype == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
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
    ranks = join(device)
    device = ranks.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    blocks = token_blocks(load_tokenizer(ckpt.path), data, tokens, seq_len, seed)
    config = ckpt.config
    run = {
        "format_version": FORMAT_VERSION, "m2d_version": __version__, "model": str(Path(model).resolve()),
        "model_type": config.model_type, "model_fingerprint": model_fingerprint(ckpt, family),
        "data": str(data), "tokens": int(blocks.numel()), "tokens_requested": tokens, "seq_len": seq_len,
        "seed": seed, "gram": gram, "dtype": str(torch_dtype).removeprefix("torch."), "batch_size": batch_size,
        "ranks": ranks.world, "num_layers": config.num_hidden_layers, "moe_layers": family.moe_layers(config),
        "num_experts": family.num_experts(config), "top_k": family.top_k(config),
        "renormalizes": family.renormalizes(config), "routed_scaling": family.routed_scaling(config),
    }
    if reuse and _same_request(out, run, complete=True):
        return Statistics(out)
    work = out.parent / f".{out.name}.partial"
    try:
        _run_layers(ckpt, family, blocks, batch_size, device, torch_dtype, gram, run, work, progress, ranks)
    except Exception:  # a refused or failed run leaves nothing; a killed one keeps `work` to resume from
        if ranks.writer:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if ranks.writer:
        remove(out)
        os.replace(work, out)
    ranks.barrier()
    if progress and ranks.writer:
        meta = json.loads((out / META).read_text())
        layers_done = meta["layers_run"]
        rate = run["tokens"] * layers_done / config.num_hidden_layers / max(meta["seconds"], 1e-9)
        print(f"calibrated {run['tokens']} tokens through {layers_done} layers in {meta['seconds']:.1f} s "
              f"({rate:,.0f} tokens/s) -> {out}")
    return Statistics(out)


def _run_layers(ckpt, family, blocks, batch_size, device, torch_dtype, gram, run, work: Path, progress,
                ranks: Ranks) -> None:
    config = ckpt.config
    hidden_file = work / f"hidden-rank{ranks.rank}.safetensors"
    start_layer, hidden = _resume(work, hidden_file, run)
    start_layer = ranks.agree_min(start_layer, device)
    if start_layer == 0:
        hidden = None
        if ranks.writer:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            write_json(work / META, {**run, "complete": False})
        ranks.barrier()
    elif ranks.writer:
        print(f"resuming calibration in {work} at layer {start_layer}")

    streamer = LayerStreamer(ckpt, family, device, torch_dtype)
    use_recording_experts(streamer.config)
    # whole batches per rank: each is computed exactly as one process computes it
    embedded, kwargs = streamer.prepare(ranks.shard(list(blocks.split(batch_size))))
    hidden = embedded if hidden is None else [h.to(device=device, dtype=torch_dtype) for h in hidden]
    moe_layers = set(run["moe_layers"])
    started, gram_seconds = time.perf_counter(), 0.0
    bar = tqdm(range(start_layer, config.num_hidden_layers), desc="calibrate", unit="layer",
               disable=not progress or not ranks.writer, initial=start_layer, total=config.num_hidden_layers)
    for index in bar:
        bar.set_postfix(layer=index)
        layer = streamer.load_layer(index)
        if index in moe_layers:
            stats = MoEStatistics(run["num_experts"], config.hidden_size, run["top_k"], gram,
                                  shared_gate=bool(family.shared and family.shared.gate), device=device)
            with recording(layer.mlp, stats, family):
                streamer.forward_layer(layer, index, hidden, kwargs)
            ranks.sum(stats.sums)
            gram_seconds += stats.gram_seconds
            sums = stats.cpu_sums()
            check_finite(sums, index, ckpt.path)  # on every rank (they hold the same sums): all stop alike
            if ranks.writer:
                save_file(sums, work / layer_file(index))
        else:
            streamer.forward_layer(layer, index, hidden, kwargs)
        del layer
        if device == "cpu":
            release_freed_heap()
        _checkpoint_hidden(hidden_file, hidden, index + 1)
        ranks.barrier()
    elapsed = time.perf_counter() - started
    hidden_file.unlink(missing_ok=True)
    ranks.barrier()
    if ranks.writer:
        write_json(work / META, {**run, "complete": True, "seconds": round(elapsed, 2),
                                 "layers_run": config.num_hidden_layers - start_layer,
                                 "gram_seconds": round(gram_seconds, 3)})


def _checkpoint_hidden(path: Path, hidden: list[torch.Tensor], next_layer: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({f"batch_{b}": h.contiguous().cpu() for b, h in enumerate(hidden)}, tmp,
              metadata={"next_layer": str(next_layer)})
    os.replace(tmp, path)


def _same_request(directory: Path, run: dict, complete: bool) -> bool:
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and bool(meta.get("complete")) == complete and \
        all(meta.get(key) == value for key, value in run.items())


def _resume(work: Path, hidden_file: Path, run: dict) -> tuple[int, list[torch.Tensor] | None]:
    """(first layer to run, this rank's saved hidden states) when `work` holds an unfinished run of the same
    request."""
    if not _same_request(work, run, complete=False):
        return 0, None
    try:
        with safe_open(hidden_file, framework="pt") as handle:
            next_layer = int(handle.metadata()["next_layer"])
        saved = load_file(hidden_file)
    except (OSError, ValueError, KeyError):
        return 0, None
    return next_layer, [saved[f"batch_{b}"] for b in range(len(saved))]
