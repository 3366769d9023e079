"""Run a HF decoder stack one layer at a time, reading each layer's weights from disk when it is needed.

The model's own classes do the computing, so calibration sees exactly what transformers computes. A skeleton
of the whole model is built on the meta device (no memory); only the embedding and rotary tables are real, and
every decoder layer is replaced by a catcher that records the arguments the model's forward hands to it (masks
of the layer's attention type, rotary tables, positions). The same trick as GPTQ/AWQ calibration.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import sys

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from megatron_m2d.errors import M2DError
from megatron_m2d.families.base import LAYERS, Family
from megatron_m2d.families.experts import expert_layout, write_expert
from megatron_m2d.io.checkpoint import Checkpoint

RELEASE_BYTES = 64 << 20  # unmap the shards after this much expert data: bounded RSS, few re-opens of a shard


def release_freed_heap() -> None:
    """Hand the C heap's free pages back to the OS after a layer (glibc's malloc_trim; elsewhere nothing). bf16
    GEMMs on CPU allocate reorder buffers of a new size for every expert's token count, and glibc keeps the freed
    blocks: measured on an 8-layer fp32 checkpoint computed in bf16, resident memory grew ~140 MB per layer
    without this and ~80 MB with it (the rest is oneDNN's primitive cache, bounded by its entry count)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# where find_library finds nothing, CDLL(None) opens the running program, which links the same C library
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):  # musl has no malloc_trim
    _LIBC = None


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records what it is called with and passes hidden states through."""

    def __init__(self, index: int, record: dict, original: nn.Module):
        super().__init__()
        self.index, self.record = index, record
        if hasattr(original, "attention_type"):  # read by some families' forward to pick the mask
            self.attention_type = original.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        self.record[self.index] = (hidden_states, kwargs)
        return hidden_states


class LayerStreamer:
    def __init__(self, ckpt: Checkpoint, family: Family | None, device: str, dtype: torch.dtype):
        """`family` None: a dense model (the D2D baseline's teacher), whose layers load as they are on disk."""
        self.ckpt, self.family, self.device, self.dtype = ckpt, family, torch.device(device), dtype
        config = copy.deepcopy(ckpt.config)
        config._attn_implementation = family.attention if family is not None else "sdpa"
        config.use_cache = False
        self.config = config
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        base = skeleton.model
        self.layer_classes = [type(layer) for layer in base.layers]
        # buffers transformers keeps in fp32 whatever the model's dtype (DeepSeek-V3's correction bias)
        self.fp32_names = tuple(getattr(type(skeleton), "_keep_in_fp32_modules_strict", None) or ())
        self.record: dict[int, tuple] = {}
        base.layers = nn.ModuleList(_Catcher(i, self.record, layer) for i, layer in enumerate(base.layers))
        embedding = ckpt.get("model.embed_tokens.weight").to(device=self.device, dtype=dtype)
        base.embed_tokens = nn.Embedding.from_pretrained(embedding, freeze=True)
        with torch.device(self.device):
            base.rotary_emb = type(base.rotary_emb)(config=config)
        base.norm = nn.Identity()
        self.base = base
        self._kwargs_by_shape: dict[tuple, dict[int, dict]] = {}

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, dict]]:
        """Embeddings of a batch, and the keyword arguments each layer gets for batches of that shape."""
        self.record.clear()
        self.base(input_ids=input_ids.to(self.device), use_cache=False)
        hidden = self.record[0][0]
        shape = tuple(input_ids.shape)
        if shape not in self._kwargs_by_shape:  # no padding: masks and rotary tables depend on the shape alone
            self._kwargs_by_shape[shape] = {i: kwargs for i, (_, kwargs) in self.record.items()}
        return hidden, self._kwargs_by_shape[shape]

    def prepare(self, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict[int, dict]]]:
        """Embeddings of every batch of token ids, and each batch's per-layer keyword arguments."""
        return [self.embed(b)[0] for b in batches], [self.layer_kwargs(tuple(b.shape)) for b in batches]

    @torch.no_grad()
    def forward_layer(self, layer: nn.Module, index: int, hidden: list[torch.Tensor], kwargs: list[dict]) -> None:
        """Run decoder layer `index` over every batch, replacing `hidden` in place."""
        for b, batch_kwargs in enumerate(kwargs):
            hidden[b] = layer(hidden[b], **batch_kwargs[index])

    def layer_kwargs(self, shape: tuple) -> dict[int, dict]:
        if shape not in self._kwargs_by_shape:
            self.embed(torch.zeros(shape, dtype=torch.long))
        return self._kwargs_by_shape[shape]

    def load_layer(self, index: int) -> nn.Module:
        """Decoder layer `index` with its weights from disk, on the streamer's device and dtype."""
        with torch.device("meta"):
            layer = self.layer_classes[index](self.config, index)
        wanted = layer.state_dict()
        state = {}
        head = f"{LAYERS}.{index}."
        for key in self.ckpt.layer_keys(index):
            if self.family is not None and self.family.is_routed_expert_key(index, key):
                continue
            name = key[len(head):]
            if self.family is not None and name.startswith(self.family.moe_block + "."):
                name = "mlp." + name[len(self.family.moe_block) + 1:]
            state[name] = self.ckpt.get(key).to(self._dtype_for(name))
        if "mlp.experts.gate_up_proj" in wanted:
            state.update(self._fused_experts(index, layer))
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise M2DError(f"layer {index}: tensors missing from the checkpoint: {', '.join(missing[:4])}")
        for name, tensor in state.items():
            if name in wanted and tuple(tensor.shape) != tuple(wanted[name].shape):
                raise M2DError(f"layer {index}: {name} has shape {tuple(tensor.shape)}, "
                               f"config says {tuple(wanted[name].shape)}")
        layer.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True, assign=True)
        self.ckpt.release()
        layer = layer.to(device=self.device, dtype=self.dtype).eval()
        for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
            if name in state and any(part in name for part in self.fp32_names):
                tensor.data = state[name].to(device=self.device, dtype=torch.float32)
        return layer

    def _dtype_for(self, name: str) -> torch.dtype:
        """Tensors are cast as they are read, so a layer is never held in two dtypes; the ones transformers keeps
        in fp32 stay as stored (load_layer restores them in fp32)."""
        return torch.float32 if any(part in name for part in self.fp32_names) else self.dtype

    def _fused_experts(self, index: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The in-memory expert stacks, filled expert by expert in the module's own layout (never two copies)."""
        experts = layer.mlp.experts
        transposed, concatenated, _ = expert_layout(experts)
        stacks = {name: torch.empty(param.shape, dtype=self._dtype_for(f"mlp.experts.{name}"))
                  for name, param in experts.named_parameters(recurse=False)}
        mapped = 0
        for e in range(next(iter(stacks.values())).shape[0]):
            weights = self.family.read_expert(self.ckpt, index, e)
            try:
                write_expert(stacks, e, weights, transposed, concatenated)
            except M2DError as exc:
                raise M2DError(f"layer {index}: {exc} (its config and weights disagree)") from None
            mapped += sum(t.numel() * t.element_size() for t in vars(weights).values() if t is not None)
            if mapped >= RELEASE_BYTES:  # read pages of a mapped shard count as resident until it is unmapped
                self.ckpt.release()
                mapped = 0
        return {f"mlp.experts.{name}": stack for name, stack in stacks.items()}
