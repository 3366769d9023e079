"""Routing statistics of one MoE layer, accumulated over calibration tokens (sums; means are taken on use).

Everything the scorings and groupings of methods.md need is a sum over tokens, so batches add up, ranks add up
(multi-process calibration sums them) and the whole calibration never has to be held at once. Each batch's
contribution is accumulated in fp32 (inside the GEMMs and reductions that compute it) and added to fp64
running sums: a Gram summed over millions of tokens loses digits in fp32.

The inputs come from the model's own forward (capture.py): the router's output, and the routed expert outputs
E_i(x_t) with the routing weights the model applies.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from megatron_m2d.calibration.gram import add_all_expert_gram
from megatron_m2d.families.experts import expert_forward
from megatron_m2d.families.parts import Routing

__all__ = ["MoEStatistics", "expert_forward"]


class MoEStatistics:
    """Sums over calibration tokens for one MoE layer with E experts, hidden size H and top-k."""

    def __init__(self, num_experts: int, hidden: int, top_k: int, gram: bool, shared_gate: bool = False,
                 device: torch.device | str = "cpu"):
        E, f64 = num_experts, dict(dtype=torch.float64, device=device)
        self.num_experts, self.top_k, self.with_gram = E, top_k, gram
        self.gram_seconds = 0.0  # time in the all-token Gram pass (the benchmark reports its GEMM rate)
        self.gram_workspace: dict[str, torch.Tensor] = {}  # the Gram pass's chunk buffer, kept over batches
        self.sums: dict[str, torch.Tensor] = {
            "tokens": torch.zeros((), **f64),
            "count": torch.zeros(E, dtype=torch.int64, device=device),  # times i was among the top-k
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
        if shared_gate:
            self.sums["shared_gate_sum"] = torch.zeros((), **f64)  # sum_t sigmoid(shared_expert_gate(x_t))

    @torch.no_grad()
    def add_routing(self, routing: Routing) -> None:
        """What the router did to one batch (the family's reading of its router module's output)."""
        z, probs, sums = routing.logits.float(), routing.probs.float(), self.sums
        sums["prob_sum"] += probs.sum(0, dtype=torch.float64)
        sums["prob_selected_sum"].index_add_(0, routing.indices.reshape(-1),
                                             probs.gather(1, routing.indices).reshape(-1).double())
        sums["logit_sum"] += z.sum(0, dtype=torch.float64)
        sums["logit_outer"] += (z.T @ z).double()

    @torch.no_grad()
    def add_routed(self, indices: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                   outputs_by_expert: torch.Tensor, weighted: torch.Tensor) -> None:
        """One call of the experts: `indices`/`weights` [T, k] as dispatched, `counts` [E] routed slots per expert,
        `outputs_by_expert` [T*k, H] the outputs E_i(x_t) grouped by expert (ascending), `weighted` [T, k, H]
        the same outputs times their weights, in token order."""
        sums, E = self.sums, self.num_experts
        sums["tokens"] += indices.shape[0]
        sums["count"] += counts
        flat_idx = indices.reshape(-1)
        sums["weight_sum"].index_add_(0, flat_idx, weights.reshape(-1).double())
        # Per token, the k x k Gram of its weighted outputs: g_a g_b <E_a, E_b>. Its diagonal is (g ||E||)^2,
        # so REAP's g ||E_i(x)|| (g >= 0) comes with it.
        pairs = _pair_products(weighted).double()  # [T, k, k]
        sums["reap_sum"].index_add_(0, flat_idx, pairs.diagonal(dim1=1, dim2=2).sqrt().reshape(-1))
        pair_index = (indices.unsqueeze(2) * E + indices.unsqueeze(1)).reshape(-1)
        sums["gram_gated"].view(-1).index_add_(0, pair_index, pairs.reshape(-1))
        sums["out_sum"] += _sum_by_expert(outputs_by_expert, counts).double()

    @torch.no_grad()
    def add_shared_gate(self, gate_logit: torch.Tensor) -> None:
        self.sums["shared_gate_sum"] += torch.sigmoid(gate_logit.double()).sum()

    def add_all_expert_gram(self, experts: nn.Module, x: torch.Tensor) -> None:
        start = time.perf_counter()
        add_all_expert_gram(self.sums, experts, x, self.gram_workspace)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.gram_seconds += time.perf_counter() - start

    def cpu_sums(self) -> dict[str, torch.Tensor]:
        return {name: value.cpu() for name, value in self.sums.items()}


def _pair_products(weighted: torch.Tensor) -> torch.Tensor:
    """Per token, the k x k inner products of its weighted outputs [T, k, H]: one batched GEMM in the compute
    dtype, accumulated in fp32. CUDA returns them in fp32; a CPU's bf16 GEMM rounds each to bf16 (2^-9 relative,
    unbiased, then summed over tokens in fp64: far inside the bf16 bounds README states), which costs a tenth of
    widening the [T, k, H] outputs to fp32 first."""
    if weighted.dtype != torch.float32 and weighted.is_cuda:
        try:
            return torch.bmm(weighted, weighted.transpose(1, 2), out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without out_dtype for this dtype
            pass
    return torch.bmm(weighted, weighted.transpose(1, 2)).float()


def _sum_by_expert(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[E, H] fp32 sums of consecutive row groups of sizes `counts`, without widening all rows at once."""
    out = torch.zeros(counts.numel(), rows.shape[-1], dtype=torch.float32, device=rows.device)
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            out[expert] = rows[start:start + count].sum(0, dtype=torch.float32)
            start += count
    return out
