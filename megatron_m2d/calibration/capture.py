"""Statistics taken from the MoE forward the model runs anyway, not from a second pass.

transformers lets a model choose how its experts compute (`config._experts_implementation`, looked up in
`ExpertsInterface`, which takes registered implementations). We register `m2d_calibration`: transformers' own
`grouped_mm` path, step for step and with the same result, that also hands the per-slot expert outputs
E_i(x_t) (before routing weights) to the statistics of its layer. Every experts class transformers decorates
with `@use_experts_implementation` runs through it with its own gate (`_apply_gate`: GPT-OSS's clamped,
interleaved SwiGLU), biases, transposed layout and post-expert norm, so the statistics see exactly the outputs
the model sums. The router's output comes from a forward hook on the family's router module, the shared-expert
gate's from a hook on that gate: nothing is computed twice.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from transformers.integrations import moe as hf_moe

from megatron_m2d.errors import M2DError

EXPERTS_IMPLEMENTATION = "m2d_calibration"
_RECORDER = "_m2d_statistics"  # attribute of an experts module while its layer is being recorded


# On CPU, bf16/fp16 matmuls go to oneDNN, which builds (JITs) a kernel for every new row count and caches it; the
# routed row counts change every batch, so the exact per-expert products ran at 89 GFLOP/s in bf16 over the first
# 32 batches (201 over the next 32) against ~510 with each expert's rows rounded up to a multiple of 32 (2 cores,
# torch 2.13, 32 experts of [512 -> 512]; 201-265 against 217-309 at Qwen3-30B-A3B's [2048 -> 1536], where the
# rounding wastes an eighth of the rows). A multiple of 64 was no faster there and wastes twice as many. fp32 goes
# to MKL, which needs no rounding and keeps the products bitwise those of torch's grouped_mm.
ROW_MULTIPLE = {torch.bfloat16: 32, torch.float16: 32}


def grouped_linear(inputs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None,
                   is_transposed: bool) -> torch.Tensor:
    """transformers' `_grouped_linear`, except on CPU, where each expert's row range is one `torch.mm`. torch's
    CPU `_grouped_mm` computes the same products but, in bf16, at the per-batch row counts (see `ROW_MULTIPLE`).
    Rounded up, an expert's range runs into the next expert's rows; experts go in order, so each row's last
    writer is its own expert, and the rows past the end land in a scratch tail. One host sync reads the offsets,
    as in transformers' own fallback."""
    if inputs.device.type != "cpu":
        return hf_moe._grouped_linear(inputs, weight, offsets, bias=bias, is_transposed=is_transposed)
    weight = weight if is_transposed else weight.transpose(-2, -1)
    rows, multiple = inputs.shape[0], ROW_MULTIPLE.get(inputs.dtype, 1)
    if multiple > 1:
        inputs = torch.cat([inputs, inputs.new_zeros(multiple - 1, inputs.shape[1])])
    out = inputs.new_empty(inputs.shape[0], weight.shape[-1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            stop = start + -(-(end - start) // multiple) * multiple
            torch.mm(inputs[start:stop], weight[expert], out=out[start:stop])
        start = end
    out = out[:rows]
    return out if bias is None else out.add_(bias)


def recording_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' `grouped_mm_experts_forward` (same operations, same result; see `grouped_linear` for CPU)
    that also records the routed expert outputs in the statistics attached to `self`. Without statistics attached
    it is transformers' own."""
    stats = getattr(self, _RECORDER, None)
    if stats is None or getattr(self, "_is_expert_parallel", False):
        return hf_moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.size(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_sorted, perm = torch.sort(expert_ids)
    tokens_per_expert = torch.bincount(expert_ids, minlength=self.num_experts)  # histc in transformers: same counts
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    inputs = hidden_states[perm // top_k]

    first = self.gate_up_proj if self.has_gate else self.up_proj
    first_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    out = grouped_linear(inputs, first, offsets, first_bias[expert_ids_sorted] if first_bias is not None else None,
                         self.is_transposed)
    out = self._apply_gate(out) if self.has_gate else self.act_fn(out)
    out = grouped_linear(out, self.down_proj, offsets,
                         self.down_proj_bias[expert_ids_sorted] if self.has_bias else None, self.is_transposed)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)  # E_i(x_t) for every routed (token, slot), grouped by expert

    weighted = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    weighted = weighted[inverse].view(num_tokens, top_k, hidden_dim)  # g_t,s E_{i_t,s}(x_t), token order
    stats.add_routed(top_k_index, top_k_weights, tokens_per_expert, out, weighted)
    if stats.with_gram:
        stats.add_all_expert_gram(self, hidden_states)
    return weighted.sum(dim=1).to(hidden_states.dtype)


hf_moe.ExpertsInterface.register(EXPERTS_IMPLEMENTATION, recording_experts_forward)


def use_recording_experts(config) -> None:
    """Make the layers built from `config` compute their experts through `recording_experts_forward`."""
    config._experts_implementation = EXPERTS_IMPLEMENTATION


@contextlib.contextmanager
def recording(moe_block: nn.Module, stats, family) -> Iterator[None]:
    """While inside, every forward of `moe_block` adds its tokens to `stats`."""
    experts = getattr(moe_block, "experts", None)
    if not hasattr(experts, "has_gate"):  # set by transformers' @use_experts_implementation
        raise M2DError(f"{type(moe_block).__name__}: its experts are not computed through transformers' experts "
                       "interface (@use_experts_implementation), so calibration cannot record them")
    if experts.config._experts_implementation != EXPERTS_IMPLEMENTATION:
        raise M2DError("internal: the layer was built without the recording experts implementation")
    router = family.router_module(moe_block)
    hooks = [router.register_forward_hook(lambda module, args, output: stats.add_routing(family.routing(output)))]
    if family.shared is not None and family.shared.gate:
        gate = moe_block.get_submodule(family.shared.gate.removesuffix(".weight"))
        hooks.append(gate.register_forward_hook(lambda module, args, output: stats.add_shared_gate(output)))
    setattr(experts, _RECORDER, stats)
    try:
        yield
    finally:
        delattr(experts, _RECORDER)
        for hook in hooks:
            hook.remove()

