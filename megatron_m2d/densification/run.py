"""`m2d densify`: statistics -> scores -> plan -> a dense HF checkpoint, its plan and its model card."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_m2d import __version__
from megatron_m2d.calibration.run import calibrate
from megatron_m2d.calibration.store import Statistics, model_fingerprint
from megatron_m2d.densification.card import densify_card
from megatron_m2d.densification.export import write_dense
from megatron_m2d.densification.grouping import GroupingFeatures
from megatron_m2d.densification.plan import LayerPlan, Method, expert_weight_loader, plan_layer
from megatron_m2d.errors import M2DError
from megatron_m2d.families import family_of
from megatron_m2d.io.checkpoint import Checkpoint
from megatron_m2d.io.model_card import public_name, write_card
from megatron_m2d.io.writer import (DEFAULT_SHARD_BYTES, atomic_directory, check_output_path, removed_on_error,
                                    write_json)

PLAN_FILE = "m2d_plan.json"
STATS_DIR = "m2d_stats"


@dataclass
class DensifyResult:
    path: Path
    plan: dict


def needs_all_token_pass(method: Method) -> bool:
    """Whether the method needs every expert run on every calibration token (`calibrate --gram`): the D-optimal
    kernel's default all-token Gram, the rms activation, and output-based groupings' all-token means."""
    all_token_gram = method.scoring in ("gram_logdet", "gld_reap") and method.kernel.gram != "gated"
    rms = method.scoring == "gld_reap" and method.kernel.activation == "rms"
    return all_token_gram or rms or method.needs_all_token_outputs


def check_statistics_serve(statistics: Statistics, methods: list[Method]) -> None:
    """Refuse up front, in one line, statistics without the all-token pass that a method cannot do without."""
    if statistics.meta.get("gram"):
        return
    for method in methods:
        if method.needs_all_token_outputs:
            raise M2DError(f"grouping {method.grouping} clusters on every expert's mean output over all tokens: "
                           f"the statistics in {statistics.path} lack them; calibrate with --gram")
        if method.scoring == "gld_reap" and method.kernel.activation == "rms":
            raise M2DError(f"--kernel-activation rms needs every expert's output on all tokens: the statistics in "
                           f"{statistics.path} lack them; calibrate with --gram")


def make_plans(ckpt: Checkpoint, family, stats: Statistics, method: Method) -> dict[int, LayerPlan]:
    config = ckpt.config
    fold = family.shared is not None and family.shared.gate is not None
    plans = {}
    for layer in family.moe_layers(config):
        features = GroupingFeatures(stats.layer(layer), expert_weight_loader(ckpt, family, layer))
        plans[layer] = plan_layer(stats.layer(layer), method, features, family.routed_scaling(config), fold)
    return plans


def densify(model: str | Path, out: str | Path, scoring: str, select: int | None = None,
            groups: int | None = None, stats: str | Path | None = None, data: str | None = None,
            overwrite: bool = False, progress: bool = True, calibration: dict | None = None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, **method_options) -> DensifyResult:
    """Densify `model` into `out`. Defaults: k = the model's top-k, K = k. `method_options` are the other
    fields of `Method` (grouping, scaling, merge, merge_alpha, kernel, seed). Without `stats`, calibrates on
    `data` first (keyword arguments of `calibrate` in `calibration`) and keeps the statistics in out/m2d_stats."""
    out = check_output_path(out, overwrite, [("--model", model), ("--stats", stats), ("--data", data)])
    ckpt = Checkpoint(model)
    family = family_of(ckpt.config)
    family.check_experts(ckpt)
    top_k = family.top_k(ckpt.config)
    groups = top_k if groups is None else groups
    method = Method(scoring=scoring, select=groups if select is None else select, groups=groups, **method_options)
    method.validate(family.num_experts(ckpt.config))
    fingerprint = model_fingerprint(ckpt, family)
    if stats is None and data is None:
        raise M2DError("densify needs --stats, or --data to calibrate first")

    # statistics calibrated here are written beside `out`, not inside its temporary sibling: a killed run's are
    # resumed by the rerun, and moved into out/m2d_stats once the student is written
    calibrated = out.parent / f".{out.name}.{STATS_DIR}"
    with atomic_directory(out, overwrite) as tmp, removed_on_error(calibrated):
        if stats is None:
            calibration = dict(calibration or {})
            if needs_all_token_pass(method):
                calibration["gram"] = True
            statistics = calibrate(model, data, calibrated, progress=progress, overwrite=True, reuse=True,
                                   **calibration)
        else:
            statistics = Statistics(stats)
        statistics.check_matches(fingerprint, model)
        check_statistics_serve(statistics, [method])
        plans = make_plans(ckpt, family, statistics, method)
        export = write_dense(ckpt, family, plans, method, tmp, progress, max_shard_bytes)
        plan = {
            "m2d_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "teacher": {"name": public_name(model), "path": str(Path(model).resolve()),
                        "model_type": ckpt.config.model_type,
                        "num_experts": family.num_experts(ckpt.config), "top_k": top_k,
                        "expert_width": family.expert_width(ckpt.config), "fingerprint": fingerprint},
            "calibration": {key: statistics.meta.get(key) for key in ("data", "tokens", "seq_len", "seed", "gram")},
            "method": method.to_json(),
            "student": export,
            "layers": {str(layer): p.to_json() for layer, p in plans.items()},
        }
        write_json(tmp / PLAN_FILE, plan)
        write_card(tmp, densify_card(plan, tmp, out.name, Path(model)))
        if stats is None:
            os.replace(calibrated, tmp / STATS_DIR)
    if progress:
        print(f"wrote {export['architecture']} (FFN width {export['width']}, {export['bytes'] / 1e6:.1f} MB) -> {out}")
    return DensifyResult(out, plan)

