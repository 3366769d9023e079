"""How one Megatron-Core parameter is made from HF tensors and back: the pieces every family's table is made of.

A family table (`dense_mapping.table`, `moe_mapping.table`) maps each parameter name of the Megatron model
(its module state-dict name, e.g. `decoder.layers.3.self_attention.linear_qkv.weight`) to one of these specs.
Specs are pure tensor bookkeeping (no Megatron import), so the same table converts a whole in-memory state dict
(tests) and streams one parameter at a time from safetensors shards (the converter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch


def _heads(config) -> tuple[int, int, int]:
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, groups, head_dim


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config) -> torch.Tensor:
    """[q; k; v] (HF, by projection) -> Megatron's per-group interleave: each query group's query heads, then
    its key head, then its value head. Works for weights and biases."""
    heads, groups, d = _heads(config)
    tail = q.shape[1:]
    q = q.reshape(groups, heads // groups * d, *tail)
    return torch.cat([q, k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads, groups, d = _heads(config)
    tail = qkv.shape[1:]
    per_group = qkv.reshape(groups, (heads // groups + 2) * d, *tail)
    q, k, v = per_group.split([heads // groups * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


@dataclass(frozen=True)
class Same:
    """One HF tensor, same layout."""
    hf: str

    def sources(self) -> tuple[str, ...]:
        return (self.hf,)

    def to_megatron(self, tensors, config) -> torch.Tensor:
        return tensors[0]

    def to_hf(self, tensor, config) -> dict[str, torch.Tensor]:
        return {self.hf: tensor}


@dataclass(frozen=True)
class PaddedRows(Same):
    """Embedding / output rows padded with zeros to Megatron's padded vocabulary (so it divides by TP)."""
    rows: int = 0

    def to_megatron(self, tensors, config) -> torch.Tensor:
        t = tensors[0]
        if t.shape[0] == self.rows:
            return t
        return torch.cat([t, t.new_zeros(self.rows - t.shape[0], *t.shape[1:])])

    def to_hf(self, tensor, config) -> dict[str, torch.Tensor]:
        return {self.hf: tensor[:config.vocab_size].contiguous()}


@dataclass(frozen=True)
class QKV:
    """Separate HF q/k/v projections <-> Megatron's fused, group-interleaved linear_qkv."""
    q: str
    k: str
    v: str

    def sources(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v)

    def to_megatron(self, tensors, config) -> torch.Tensor:
        return fuse_qkv(*tensors, config)

    def to_hf(self, tensor, config) -> dict[str, torch.Tensor]:
        return {name: t.contiguous() for name, t in zip(self.sources(), split_qkv(tensor, config))}


@dataclass(frozen=True)
class Rows:
    """HF tensors stacked by rows: a gated fc1 is the gate rows then the up rows (equal halves)."""
    parts: tuple[str, ...]

    def sources(self) -> tuple[str, ...]:
        return self.parts

    def to_megatron(self, tensors, config) -> torch.Tensor:
        return torch.cat(list(tensors))

    def to_hf(self, tensor, config) -> dict[str, torch.Tensor]:
        return {name: t.contiguous() for name, t in zip(self.parts, tensor.chunk(len(self.parts)))}


@dataclass(frozen=True)
class ExpertRow:
    """Expert `expert` of a HF tensor stacked over experts (GPT-OSS stores its experts fused). Its source is
    named `key#expert`; `to_hf` gives that row back and the exporter stacks the rows. Layouts: "glu_weight"
    ([H, 2I] input-major, gate and up columns interleaved -> [2I, H], gate rows then up rows), "glu_bias"
    (interleaved -> halves), "transpose" ([I, H] -> [H, I]), "same"."""
    hf: str
    expert: int
    layout: str

    def sources(self) -> tuple[str, ...]:
        return (f"{self.hf}#{self.expert}",)

    def to_megatron(self, tensors, config) -> torch.Tensor:
        t = tensors[0]
        if self.layout == "glu_weight":
            return torch.cat([t[:, 0::2].T, t[:, 1::2].T])
        if self.layout == "glu_bias":
            return torch.cat([t[0::2], t[1::2]])
        return t.T if self.layout == "transpose" else t

    def to_hf(self, tensor, config) -> dict[str, torch.Tensor]:
        if self.layout in ("glu_weight", "glu_bias"):
            gate, up = tensor.chunk(2)
            if self.layout == "glu_weight":
                gate, up = gate.T, up.T
            row = torch.stack([gate, up], dim=-1).reshape(*gate.shape[:-1], -1)
        else:
            row = tensor.T if self.layout == "transpose" else tensor
        return {self.sources()[0]: row.contiguous()}


Spec = Same | QKV | Rows | ExpertRow


def split_source(name: str) -> tuple[str, int | None]:
    """`key#e` -> (key, e): row e of a stacked tensor; a plain key -> (key, None)."""
    key, _, row = name.partition("#")
    return key, int(row) if row else None


def read_source(hf: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    key, row = split_source(name)
    return hf[key] if row is None else hf[key][row]


def stack_rows(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows named `key#e` stacked back into `key` (in expert order); other names unchanged."""
    out, rows = {}, {}
    for name, tensor in tensors.items():
        key, row = split_source(name)
        if row is None:
            out[name] = tensor
        else:
            rows.setdefault(key, {})[row] = tensor
    for key, by_row in rows.items():
        out[key] = torch.stack([by_row[e] for e in sorted(by_row)])
    return out


def to_megatron(hf: Mapping[str, torch.Tensor], table: Mapping[str, Spec], config) -> dict[str, torch.Tensor]:
    """A whole in-memory HF state dict through a family table (the converter streams the same specs)."""
    return {name: spec.to_megatron([read_source(hf, s) for s in spec.sources()], config)
            for name, spec in table.items()}


def to_hf(megatron: Mapping[str, torch.Tensor], table: Mapping[str, Spec], config) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, spec in table.items():
        out.update(spec.to_hf(megatron[name], config))
    return stack_rows(out)


def hf_sources(table: Mapping[str, Spec]) -> set[str]:
    """The HF tensor names a table reads (a stacked tensor once, whichever rows it reads)."""
    return {split_source(s)[0] for spec in table.values() for s in spec.sources()}
