"""`m2d random-ffn`: the teacher's attention, embeddings and norms with a freshly initialised dense FFN of the
student's width: the lower bound of what distillation alone recovers (methods.md)."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_m2d.densification.export import dense_width, write_student
from megatron_m2d.errors import M2DError
from megatron_m2d.families import family_of
from megatron_m2d.families.base import ExpertWeights
from megatron_m2d.io.checkpoint import Checkpoint
from megatron_m2d.io.model_card import new_card, public_name, table, write_card
from megatron_m2d.io.writer import atomic_directory, check_output_path, write_json


def random_ffn(model: str | Path, out: str | Path, groups: int | None = None, seed: int = 0,
               overwrite: bool = False, progress: bool = True) -> Path:
    """Dense student of `model` (same class and width as `m2d densify --groups k` writes) whose FFNs are
    drawn from N(0, initializer_range^2), transformers' own initialisation of Linear layers."""
    out = check_output_path(out, overwrite, [("--model", model)])
    ckpt = Checkpoint(model)
    family = family_of(ckpt.config)
    groups = family.top_k(ckpt.config) if groups is None else groups
    if groups < 1:
        raise M2DError("--groups must be at least 1")
    if groups > family.num_experts(ckpt.config):  # densify's k <= K <= E, so the widths compare
        raise M2DError(f"--groups {groups} exceeds the {family.num_experts(ckpt.config)} experts per layer")
    _, width = dense_width(family, ckpt.config, groups)
    hidden, std = ckpt.config.hidden_size, float(getattr(ckpt.config, "initializer_range", 0.02))

    def fresh(layer: int, layout: str, dtype: torch.dtype) -> ExpertWeights:
        generator = torch.Generator().manual_seed(seed * 100003 + layer)
        draw = lambda *shape: (torch.randn(*shape, generator=generator) * std).to(dtype)
        return ExpertWeights(draw(width, hidden), draw(width, hidden), draw(hidden, width))

    with atomic_directory(out, overwrite) as tmp:
        info = write_student(ckpt, family, groups, fresh, tmp, progress)
        write_json(tmp / "m2d_plan.json", {"method": {"baseline": "random_ffn", "groups": groups, "seed": seed,
                                                      "std": std}, "student": info,
                                           "teacher": {"name": public_name(model), "path": str(Path(model).resolve())}})
        method = {"FFN": f"drawn from N(0, {std:g}^2) (the teacher's initializer_range), seed {seed}",
                  "FFN width": f"{width} = {groups} experts, as `m2d densify --groups {groups}` writes",
                  "attention, embeddings, norms": "the teacher's, unchanged"}
        write_card(tmp, new_card(
            teacher=model, teacher_dir=model, model_dir=tmp, name=out.name,
            title=f"Random-FFN baseline of {public_name(model)}",
            summary=(f"The random-FFN baseline: the attention, embeddings and norms of the Mixture-of-Experts "
                     f"`{public_name(model)}` with a freshly initialised dense FFN of width {width}, as "
                     f"`{info['architecture']}`: the same class and width as a densified student, so it measures "
                     "what distillation alone recovers without the experts' weights."),
            facts={"class": f"`{info['architecture']}`", "FFN width": width, "teacher": f"`{public_name(model)}`",
                   "size": f"{info['bytes'] / 1e6:,.1f} MB"},
            made=[("How it was made", table(method, ("method", "setting")))], tags=["moe-to-dense", "baseline"]))
    if progress:
        print(f"wrote {info['architecture']} with a random FFN of width {width} -> {out}")
    return out
