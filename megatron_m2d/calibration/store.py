"""Calibration statistics on disk: a directory of `layer_NNN.safetensors` sums plus `meta.json`.

Sums, not means, are stored so that a statistics directory can be extended and checked against brute force
exactly; `LayerStats` turns them into the per-expert quantities of methods.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from megatron_m2d.errors import M2DError

META = "meta.json"
# Conditional probability CP_i (methods.md): "probability" is the paper's Eq. 3, the mean over the tokens routed to
# i of its softmax probability over all experts (DeepSeek-V3: its sigmoid score), as the PEFT moe_to_dense port
# computes it; "routing_weight" is the mean weight the model applies to i there (renormalised over the top-k where
# the router renormalises, routed_scaling_factor included): it differs for every router that renormalises.
CP_KINDS = ("probability", "routing_weight")
FORMAT_VERSION = 2  # 2: prob_selected_sum (the paper's CP), probs from the family's router


def layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


def check_finite(sums: dict[str, torch.Tensor], layer: int, source) -> None:
    """Statistics with NaN or inf are an error, never a result: densify would rank experts by them silently."""
    for name, value in sums.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise M2DError(f"{source}: statistic {name} of layer {layer} holds NaN or infinite values")


def model_fingerprint(ckpt, family) -> str:
    """Identifies the teacher: architecture plus the bytes of the first MoE router (cheap to read, and any
    other trained model has other router weights)."""
    config = ckpt.config
    first = family.moe_layers(config)[0]
    router = ckpt.get(family.block_key(first, family.router)).float().contiguous()
    digest = hashlib.sha256(router.numpy().tobytes())
    digest.update(json.dumps([config.model_type, config.num_hidden_layers, family.num_experts(config),
                              config.hidden_size]).encode())
    return digest.hexdigest()[:16]


@dataclass
class LayerStats:
    """Per-expert quantities of one MoE layer (notation of methods.md)."""

    layer: int
    sums: dict[str, torch.Tensor]
    top_k: int
    cp: str = "probability"  # which conditional probability `conditional_prob` is (CP_KINDS)

    @property
    def tokens(self) -> float:
        return float(self.sums["tokens"])

    @property
    def num_experts(self) -> int:
        return int(self.sums["count"].numel())

    @property
    def selection_freq(self) -> torch.Tensor:  # f_i
        return self.sums["count"].double() / self.tokens

    @property
    def preselect_prob(self) -> torch.Tensor:  # mean p_t,i
        return self.sums["prob_sum"] / self.tokens

    @property
    def postselect_prob(self) -> torch.Tensor:  # a_i, expected routing weight
        return self.sums["weight_sum"] / self.tokens

    @property
    def conditional_prob(self) -> torch.Tensor:  # CP_i: mean over the tokens routed to i; 0 if never selected
        if self.cp not in CP_KINDS:
            raise M2DError(f"unknown conditional probability {self.cp!r} (choose from {', '.join(CP_KINDS)})")
        key = "prob_selected_sum" if self.cp == "probability" else "weight_sum"
        if key not in self.sums:
            raise M2DError("these statistics predate the paper's conditional probability (statistics format 1): "
                           "calibrate again, or use --cp routing_weight")
        count = self.sums["count"].double()
        return torch.where(count > 0, self.sums[key] / count.clamp(min=1), torch.zeros_like(count))

    @property
    def reap(self) -> torch.Tensor:  # mean over routed tokens of g_t,i ||E_i(x_t)||
        count = self.sums["count"].double()
        return torch.where(count > 0, self.sums["reap_sum"] / count.clamp(min=1), torch.zeros_like(count))

    def gram(self, kind: str) -> torch.Tensor:
        """Mean Gram: 'gated' E_t[g_i g_j <E_i, E_j>] (always recorded) or 'all' E_t[<E_i, E_j>] (--gram)."""
        key = {"gated": "gram_gated", "all": "gram"}[kind]
        if key not in self.sums:
            raise M2DError("these statistics have no all-token Gram: calibrate with --gram, "
                           "or use the gate-weighted kernel (--kernel-gram gated)")
        return self.sums[key] / self.tokens

    def resolve_gram(self, kind: str) -> str:
        if kind == "auto":
            return "all" if "gram" in self.sums else "gated"
        return kind

    def mean_outputs(self) -> torch.Tensor:
        """Per-expert mean output over all calibration tokens (HC-SMoE clusters on it): recorded by --gram only.
        Routed-token means are no substitute (an expert's mean over the tokens it serves says nothing of how it
        differs from another on the same tokens), so without them this refuses."""
        if "out_sum_all" not in self.sums:
            raise M2DError("output-based groupings (output_cluster, dominant_expert) need every expert's mean output "
                           "over all tokens: calibrate with --gram")
        return self.sums["out_sum_all"] / self.tokens

    def logit_distances(self) -> torch.Tensor:
        """Euclidean distances between experts' routing-logit profiles over the calibration tokens, computed
        exactly from the second moment: ||z_i - z_j||^2 = S_ii + S_jj - 2 S_ij (per token, averaged)."""
        second = self.sums["logit_outer"] / self.tokens
        diag = second.diagonal()
        return (diag[:, None] + diag[None, :] - 2 * second).clamp(min=0).sqrt()

    @property
    def mean_total_routed_weight(self) -> float:  # E_t sum_{i in S_t} w_t,i, as applied (rsf included)
        return float(self.sums["weight_sum"].sum() / self.tokens)

    @property
    def shared_gate_mean(self) -> float | None:
        if "shared_gate_sum" not in self.sums:
            return None
        return float(self.sums["shared_gate_sum"] / self.tokens)


def _check_layout(sums: dict[str, torch.Tensor], layer: int, source) -> None:
    """Shapes every statistic of one layer must agree on (E experts): a damaged or foreign file is refused."""
    count, tokens = sums.get("count"), sums.get("tokens")
    if count is None or count.dim() != 1 or tokens is None or tokens.dim() != 0 or not float(tokens) > 0:
        raise M2DError(f"{source}: layer {layer} statistics lack per-expert counts or a positive token count")
    from megatron_m2d.calibration.statistics import MoEStatistics

    absent = sorted(set(MoEStatistics(2, 1, 1, gram=False).sums) - set(sums))  # what every calibration records
    if absent:
        raise M2DError(f"{source}: layer {layer} statistics lack {', '.join(absent)}; calibrate again")
    experts = count.numel()
    for name, value in sums.items():
        square = "gram" in name or "outer" in name
        if value.dim() and (value.shape[0] != experts or (square and tuple(value.shape) != (experts, experts))):
            raise M2DError(f"{source}: layer {layer} statistic {name} has shape {tuple(value.shape)}, not one row "
                           f"per expert of {experts}")


class Statistics:
    """A finished statistics directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = self.path / META
        if not meta.is_file():
            raise M2DError(f"{self.path} is not a statistics directory (no {META})")
        try:
            self.meta = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise M2DError(f"corrupt {meta}") from None
        layers, top_k = (self.meta.get(k) if isinstance(self.meta, dict) else None for k in ("moe_layers", "top_k"))
        if not isinstance(layers, list) or not all(type(i) is int and i >= 0 for i in layers) \
                or type(top_k) is not int or top_k < 1:
            raise M2DError(f"corrupt {meta}: it needs moe_layers (layer numbers) and top_k (>= 1)")
        if not self.meta.get("complete"):
            raise M2DError(f"statistics in {self.path} are incomplete; rerun calibrate to finish them")
        self._cache: dict[int, LayerStats] = {}

    @property
    def moe_layers(self) -> list[int]:
        return list(self.meta["moe_layers"])

    def layer(self, index: int) -> LayerStats:
        if index not in self._cache:
            try:
                sums = load_file(self.path / layer_file(index))
            except (SafetensorError, FileNotFoundError, OSError) as exc:
                raise M2DError(f"cannot read statistics of layer {index} in {self.path}: {exc}") from None
            _check_layout(sums, index, self.path)
            check_finite(sums, index, self.path)
            self._cache[index] = LayerStats(index, sums, int(self.meta["top_k"]))
        return self._cache[index]

    def check_matches(self, fingerprint: str, model_path) -> None:
        if self.meta.get("model_fingerprint") != fingerprint:
            raise M2DError(f"statistics in {self.path} were computed on another model "
                           f"({self.meta.get('model')}), not {model_path}")
