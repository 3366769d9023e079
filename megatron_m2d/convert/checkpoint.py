"""A dense student or a MoE teacher between a HF directory and a Megatron-Core distributed checkpoint, streamed.

hf-to-megatron: the Megatron model is built on the meta device (nothing allocated) only to learn the checkpoint's
keys, shapes and chunking; each parameter is then computed from the HF shards when the writer reaches it, so
peak memory is a file's worth of chunks plus one parameter, whatever the model size. In one process the chunks
are whole parameters (TP1/PP1/EP1 chunking), which megatron-core reshards to any TP/PP/EP on load; under
torchrun with `tp*pp*ep` ranks each rank writes its own shard of the target layout.

megatron-to-hf: reads one decoder layer's chunks at a time (from our checkpoint or one megatron-core saved under
any layout), maps them back and writes HF safetensors shards.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from megatron_m2d import __version__
from megatron_m2d.convert.dcp_read import ChunkReader
from megatron_m2d.convert.dcp_stream import Chunk, model_chunks, save_streaming
from megatron_m2d.convert.dense_mapping import padded_vocab
from megatron_m2d.convert.mapping import hf_sources, split_source, stack_rows
from megatron_m2d.convert.megatron_model import build_gpt_model, table_for, transformer_config_kwargs
from megatron_m2d.convert.parallel import ParallelSizes
from megatron_m2d.convert.provider import META, ProviderConfig, read_provider_config
from megatron_m2d.errors import M2DError
from megatron_m2d.io.checkpoint import Checkpoint
from megatron_m2d.io import model_card as cards
from megatron_m2d.io.writer import ShardedWriter, atomic_directory, check_output_path, copy_side_files, write_json

SIDE_FILES_DIR = "hf_side_files"
EXPORT_SHARD_BYTES = 512 << 20  # a shard is assembled in memory before it is written: part of export's peak


def _start_parallel_state(layout: ParallelSizes) -> None:
    """megatron-core's parallel state for `layout`, on a gloo group (a single-process one if none exists)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "WORLD_SIZE" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
            dist.init_process_group("gloo", rank=0, world_size=1)
        else:
            dist.init_process_group("gloo")
    if parallel_state.model_parallel_is_initialized():
        have = ParallelSizes.from_parallel_state()
        if have != layout:
            raise M2DError(f"megatron-core is initialised for {have}, the conversion needs {layout}")
        return
    parallel_state.initialize_model_parallel(layout.tp, layout.pp, virtual_pipeline_model_parallel_size=layout.vpp,
                                             expert_model_parallel_size=layout.ep)


def _write_layout(parallel: ParallelSizes) -> ParallelSizes:
    """One process writes whole parameters (loadable at any layout); torchrun with exactly tp*pp*ep ranks
    writes the target layout, each rank its shard."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ParallelSizes()
    if world != parallel.model_parallel_world:
        raise M2DError(f"launched on {world} ranks; writing a --tp {parallel.tp} --pp {parallel.pp} "
                       f"--ep {parallel.ep} layout takes {parallel.model_parallel_world} (or run one process)")
    return parallel


def _meta_model_chunks(config, dtype, parallel: ParallelSizes, vocab_rows: int):
    """All chunks this rank holds, over its virtual pipeline stages; nothing is allocated."""
    chunks, objects = [], []
    for vp_stage in range(parallel.vpp) if parallel.vpp else [None]:
        try:
            with torch.device("meta"):
                model = build_gpt_model(config, dtype, parallel, vocab_rows, vp_stage=vp_stage, use_te=False)
        except (AssertionError, RuntimeError) as e:
            if "CUDA" not in str(e) and "NVIDIA" not in str(e):
                raise
            # MLA's rotary embedding and the attention sinks' offsets (GPT-OSS) are created on the current CUDA
            # device whatever use_cpu_initialization says: nothing to do about it short of patching megatron-core
            raise M2DError(f"megatron-core needs a CUDA device to build the {config.model_type} model "
                           f"({str(e).splitlines()[0]}); run the conversion on a machine with a GPU") from None
        c, o = model_chunks(model)
        chunks, objects = chunks + c, objects + o
    return chunks, objects


def _layer_of(param: str) -> str:
    parts = param.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["decoder", "layers"] else "globals"


class _ParameterSource:
    """Computes Megatron parameters from the HF shards; keeps the last one, since a parameter's chunks (e.g.
    fc1's gate and up halves) are written one after the other. Chunks come in model order, so the shards are
    unmapped at each new layer (read pages of a mapped shard stay in RSS until then)."""

    def __init__(self, ckpt: Checkpoint, table, progress):
        self.ckpt, self.table, self.progress = ckpt, table, progress
        self.name, self.value, self.layer = None, None, None

    def __call__(self, chunk: Chunk) -> torch.Tensor:
        if _layer_of(chunk.param) != self.layer:
            self.ckpt.release()
            self.layer = _layer_of(chunk.param)
        self.progress.update()
        if chunk.param != self.name:
            spec = self.table[chunk.param]
            value = spec.to_megatron([self._read(s) for s in spec.sources()], self.ckpt.config)
            if tuple(value.shape) != chunk.param_shape:
                raise M2DError(f"{chunk.param}: HF tensors give shape {tuple(value.shape)}, the Megatron model "
                               f"expects {chunk.param_shape} (config and weights disagree)")
            self.name, self.value = chunk.param, value.to(chunk.dtype).contiguous()
        return chunk.take(self.value)

    def _read(self, source: str) -> torch.Tensor:
        key, row = split_source(source)
        return self.ckpt.get(key) if row is None else self.ckpt.get_row(key, row)  # one expert of a stack


@contextmanager
def _shared_output_directory(out: Path, overwrite: bool):
    """atomic_directory, shared by all ranks: rank 0 owns it and renames it once every rank has written."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    with ExitStack() as stack:
        box = [str(stack.enter_context(atomic_directory(out, overwrite))) if rank == 0 else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        yield Path(box[0]), rank == 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every rank's files are in before rank 0 renames the directory


def hf_to_megatron_checkpoint(model: str | Path, out: str | Path, parallel: ParallelSizes = ParallelSizes(),
                              overwrite: bool = False, vocab_divisible_by: int = 128, progress: bool = True) -> Path:
    """Convert a HF checkpoint (teacher or densified student) to a Megatron-Core `torch_dist` checkpoint plus
    `m2d_convert.json`, streaming one parameter at a time."""
    out = check_output_path(out, overwrite, [("--model", model)])
    ckpt = Checkpoint(model)
    config, dtype = ckpt.config, ckpt.dtype()
    vocab_rows = padded_vocab(config, vocab_divisible_by)
    problems = parallel.problems(transformer_config_kwargs(config), vocab_rows)
    if problems:
        raise M2DError("; ".join(problems))
    table = table_for(config, vocab_rows)
    available = set(ckpt.keys())
    missing = sorted(hf_sources(table) - available)
    tied_head = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    unused = sorted(available - hf_sources(table) - tied_head)
    if missing or unused:
        raise M2DError(f"{model}: weights do not match the {config.model_type} mapping "
                       f"(missing {missing[:3]}, not mapped {unused[:3]})")
    layout = _write_layout(parallel)
    _start_parallel_state(layout)
    chunks, objects = _meta_model_chunks(config, dtype, layout, vocab_rows)
    unmapped = sorted({c.param for c in chunks} - set(table))
    if unmapped:
        raise M2DError(f"internal error: Megatron parameters without a mapping: {unmapped[:3]}")
    import torch.distributed as dist

    group = dist.group.WORLD  # gloo, set up above (a one-process group when not launched by torchrun)
    with _shared_output_directory(out, overwrite) as (tmp, coordinator), \
            tqdm(total=len(chunks), desc="hf-to-megatron", unit="chunk", disable=not (progress and coordinator)) as bar:
        save_streaming(tmp, chunks, objects, _ParameterSource(ckpt, table, bar), process_group=group)
        if coordinator:
            others = {k: str(ckpt.dtype_of(k)).removeprefix("torch.") for k in sorted(available)}
            # MXFP4 experts (GPT-OSS as published) were dequantised one expert at a time by the reader: the
            # Megatron checkpoint, and every HF export of it, holds them in the model's dtype
            hf_config = copy.deepcopy(config)
            hf_config.__dict__.pop("quantization_config", None)
            provider = ProviderConfig(hf_config, parallel, vocab_rows, dtype,
                                      {k: v for k, v in others.items() if v != str(dtype).removeprefix("torch.")})
            write_json(tmp / META, provider.to_json(source=str(Path(model).resolve()), m2d_version=__version__,
                                                   written_layout=vars(layout)))
            (tmp / SIDE_FILES_DIR).mkdir()
            copy_side_files(ckpt.path, tmp / SIDE_FILES_DIR)
            for record in (cards.CARD, "m2d_plan.json"):  # the card and plan travel on to the exported HF model
                if (ckpt.path / record).is_file():
                    shutil.copy2(ckpt.path / record, tmp / SIDE_FILES_DIR / record)
    return out


def _by_layer(chunks: list[Chunk]) -> dict[str, list[Chunk]]:
    groups: dict[str, list[Chunk]] = {}
    for c in chunks:
        groups.setdefault(_layer_of(c.param), []).append(c)
    return groups


def megatron_to_hf_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False,
                              progress: bool = True, write_card=None) -> Path:
    """Export a Megatron-Core checkpoint (converted by us, or saved by Megatron training under any layout) to HF
    safetensors, one decoder layer in memory at a time. `write_card(directory)` writes the model card (and any
    record beside it) into the output before it is renamed into place; by default a card saying where it came
    from (a distillation checkpoint's export adds its record: distillation.megatron.export)."""
    checkpoint, out = Path(checkpoint), check_output_path(out, overwrite, [("--model", checkpoint)])
    provider = read_provider_config(checkpoint)
    config, dtype = provider.hf_config, provider.dtype
    reader = ChunkReader(checkpoint)
    _start_parallel_state(ParallelSizes())
    chunks, _ = _meta_model_chunks(config, dtype, ParallelSizes(), provider.vocab_rows)
    table = table_for(config, provider.vocab_rows)
    with atomic_directory(out, overwrite) as tmp:
        writer = ShardedWriter(tmp, EXPORT_SHARD_BYTES)
        for group in tqdm(_by_layer(chunks).values(), desc="megatron-to-hf", unit="layer", disable=not progress):
            values = reader.read(group)  # one layer's chunks; each is dropped once its parameter is written
            by_param: dict[str, list[Chunk]] = {}
            for c in group:
                by_param.setdefault(c.param, []).append(c)
            rows: dict[str, torch.Tensor] = {}  # experts of a fused HF tensor (GPT-OSS), stacked per layer
            for name, parts in by_param.items():
                param = torch.empty(parts[0].param_shape, dtype=parts[0].dtype)
                for c in parts:
                    c.put(param, values.pop((c.key, c.offsets)))
                for hf_name, value in table[name].to_hf(param, config).items():
                    if split_source(hf_name)[1] is not None:
                        rows[hf_name] = value
                    else:
                        writer.add(hf_name, value.to(provider.hf_dtype(hf_name)))
            for hf_name, value in stack_rows(rows).items():
                writer.add(hf_name, value.to(provider.hf_dtype(hf_name)))
        writer.close()
        config.save_pretrained(tmp)
        side = checkpoint / SIDE_FILES_DIR
        if side.is_dir():
            copy_side_files(side, tmp)
        if (side / "m2d_plan.json").is_file():
            shutil.copy2(side / "m2d_plan.json", tmp / "m2d_plan.json")
        if write_card is not None:
            write_card(tmp)
        else:
            _write_export_card(tmp, Path(out).name, checkpoint, provider)
    return out


def _write_export_card(directory: Path, name: str, checkpoint: Path, provider: ProviderConfig) -> None:
    """The card of the HF model the checkpoint was converted from (kept in its side files) with the conversion
    recorded and the dtype read back from the exported files; a plain card when there was none."""
    note = (f"This model was exported from Megatron-Core by megatron_m2d {__version__} (`m2d convert "
            f"megatron-to-hf`): the `torch_dist` checkpoint `{cards.public_name(checkpoint)}`, whose provider "
            f"config targets TP {provider.parallel.tp} / PP {provider.parallel.pp} / EP {provider.parallel.ep}; the "
            f"padded vocabulary ({provider.vocab_rows} rows) was cut back to {provider.hf_config.vocab_size}.")
    card = cards.read_card(checkpoint / SIDE_FILES_DIR)
    if card is None:
        card = cards.new_card(teacher=None, teacher_dir=None, model_dir=directory, name=name,
                              title=f"{provider.hf_config.model_type} exported from Megatron-Core", summary=note,
                              facts={"class": f"`{(provider.hf_config.architectures or ['?'])[0]}`"}, made=[])
    card = cards.set_fact(cards.add_section(card, "Conversion", note), "weights", cards.weights_dtype(directory))
    cards.write_card(directory, card)
