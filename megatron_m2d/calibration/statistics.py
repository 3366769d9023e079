"""Routing statistics of one MoE layer, accumulated over calibration tokens (sums; means are taken on use).

Everything the scorings and groupings of methods.md need is a sum over tokens, so batches add up and the
whole calibration never has to be held at once. Accumulators are float64: a Gram summed over millions of
tokens loses digits in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_m2d.families.experts import expert_forward, expert_outputs

# Tokens per chunk when every expert runs on every token (--gram): bounds the E x chunk x (2I + H) buffer.
GRAM_CHUNK_ELEMENTS = 16 * 1024**2

__all__ = ["MoEStatistics", "expert_forward"]


class MoEStatistics:
    """Sums over calibration tokens for one MoE layer with E experts, hidden size H and top-k."""

    def __init__(self, num_experts: int, hidden: int, top_k: int, gram: bool, shared_gate: str | None = None):
        E, f64 = num_experts, dict(dtype=torch.float64)
        self.num_experts, self.top_k, self.with_gram = E, top_k, gram
        # on-disk name of a sigmoid shared-expert gate ('shared_expert_gate.weight'): its module holds the gate
        self.shared_gate_module = shared_gate.removesuffix('.weight') if shared_gate else None
        self.sums: dict[str, torch.Tensor] = {
            "tokens": torch.zeros((), **f64),
            "count": torch.zeros(E, dtype=torch.int64),  # times i was among the top-k
            "prob_sum": torch.zeros(E, **f64),  # sum_t p_t,i (softmax over all E; DeepSeek-V3: sigmoid scores)
            "prob_selected_sum": torch.zeros(E, **f64),  # sum_t p_t,i over tokens routed to i (the paper's CP)
            "weight_sum": torch.zeros(E, **f64),  # sum_t g_t,i over tokens routed to i
            "reap_sum": torch.zeros(E, **f64),  # sum_t g_t,i ||E_i(x_t)|| over tokens routed to i
            "out_sum": torch.zeros(E, hidden, **f64),  # sum of E_i(x_t) over tokens routed to i
            "logit_sum": torch.zeros(E, **f64),  # routing-logit profiles: first and second moments
            "logit_outer": torch.zeros(E, E, **f64),
            "gram_gated": torch.zeros(E, E, **f64),  # sum_t g_t,i g_t,j <E_i(x_t), E_j(x_t)>
        }
        if gram:
            self.sums["gram"] = torch.zeros(E, E, **f64)  # sum_t <E_i(x_t), E_j(x_t)>, every expert, every token
            self.sums["out_sum_all"] = torch.zeros(E, hidden, **f64)
        if self.shared_gate_module:
            self.sums["shared_gate_sum"] = torch.zeros((), **f64)  # sum_t sigmoid(shared_expert_gate(x_t))

    @torch.no_grad()
    def update(self, moe_block: nn.Module, x: torch.Tensor, route) -> None:
        """Add the tokens `x` [T, H] (the MoE block's input) routed by the block's own router (`route`:
        the family's `route`, transformers' router module: the selection and weights the model makes)."""
        x = x.reshape(-1, x.shape[-1])
        logits, weights, indices, probs = route(moe_block, x)
        sums, E, cpu = self.sums, self.num_experts, torch.device("cpu")
        sums["tokens"] += x.shape[0]
        sums["count"] += torch.bincount(indices.flatten(), minlength=E).to(cpu)
        sums["prob_sum"] += probs.sum(0).to(cpu, torch.float64)
        sums["prob_selected_sum"] += torch.zeros(E, dtype=torch.float64, device=x.device).index_add_(
            0, indices.flatten(), probs.gather(1, indices).flatten().to(torch.float64)).cpu()
        flat_idx, flat_w = indices.flatten(), weights.flatten().to(torch.float64)
        sums["weight_sum"] += torch.zeros(E, dtype=torch.float64, device=x.device).index_add_(0, flat_idx, flat_w).cpu()
        z = logits.to(torch.float64)
        sums["logit_sum"] += z.sum(0).cpu()
        sums["logit_outer"] += (z.T @ z).cpu()

        # Routed outputs, token slot by slot: outputs[t, s] = E_{indices[t, s]}(x_t).
        outputs = torch.zeros(*indices.shape, x.shape[-1], dtype=torch.float32, device=x.device)
        for expert in indices.unique().tolist():
            token, slot = torch.where(indices == expert)
            outputs[token, slot] = expert_forward(moe_block.experts, expert, x[token]).float()
        norms = outputs.norm(dim=-1).to(torch.float64)
        sums["reap_sum"] += torch.zeros(E, dtype=torch.float64, device=x.device).index_add_(0, flat_idx, (flat_w * norms.flatten())).cpu()
        sums["out_sum"] += torch.zeros(E, x.shape[-1], dtype=torch.float64, device=x.device).index_add_(
            0, flat_idx, outputs.reshape(-1, x.shape[-1]).to(torch.float64)).cpu()
        gated = outputs * weights.float().unsqueeze(-1)  # [T, k, H]
        pair_gram = (gated @ gated.transpose(1, 2)).to(torch.float64)  # [T, k, k]
        pair_index = (indices.unsqueeze(2) * E + indices.unsqueeze(1)).flatten()
        sums["gram_gated"] += torch.zeros(E * E, dtype=torch.float64, device=x.device).index_add_(
            0, pair_index, pair_gram.flatten()).view(E, E).cpu()

        if self.with_gram:
            self._update_full_gram(moe_block.experts, x)
        if "shared_gate_sum" in sums:
            gate = moe_block.get_submodule(self.shared_gate_module)
            sums["shared_gate_sum"] += torch.sigmoid(gate(x).double()).sum().cpu()

    def _update_full_gram(self, experts: nn.Module, x: torch.Tensor) -> None:
        E = self.num_experts
        width = experts.gate_up_proj[0].numel() // x.shape[-1] + x.shape[-1]  # 2I + H, whatever the layout
        chunk = max(1, GRAM_CHUNK_ELEMENTS // (E * width))
        for start in range(0, x.shape[0], chunk):
            part = x[start:start + chunk]
            outputs = expert_outputs(experts, part).float()  # [E, n, H]
            flat = outputs.reshape(E, -1)
            self.sums["gram"] += (flat @ flat.T).to(torch.float64).cpu()
            self.sums["out_sum_all"] += outputs.sum(1).to(torch.float64).cpu()
