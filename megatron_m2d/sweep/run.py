"""`m2d sweep`: one calibration pass, many densification methods, each evaluated by held-out perplexity.

The paper's screen is 7 scorings x 5 groupings x 2 scalings x 5 K = 350 configurations. The dense student has
the same architecture for every configuration (its width is k experts), so one student is loaded once and each
configuration only rewrites its FFN weights in memory: nothing goes to disk unless --save-checkpoints.
With K = k every expert is its own group, so groupings cannot differ: those rows are evaluated once and
marked `same_as`. Results are appended to results.jsonl as they come, so a killed sweep continues where it
stopped; CSV and Markdown tables and PNG plots are written at the end.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from megatron_m2d.calibration.run import calibrate
from megatron_m2d.calibration.store import META, Statistics, model_fingerprint
from megatron_m2d.data.text import token_stream
from megatron_m2d.densification.export import build_ffn, dense_width, write_dense, zero_pad
from megatron_m2d.densification.grouping import GROUPINGS
from megatron_m2d.densification.merge import SCALINGS
from megatron_m2d.densification.plan import Method
from megatron_m2d.densification.run import check_statistics_serve, densify, make_plans
from megatron_m2d.densification.scoring import SCORINGS, KernelOptions
from megatron_m2d.errors import M2DError
from megatron_m2d.evaluation.perplexity import load_model, stream_perplexity
from megatron_m2d.families import family_of
from megatron_m2d.families.experts import pack_expert
from megatron_m2d.io.checkpoint import Checkpoint
from megatron_m2d.io.writer import run_directory, write_text_atomically
from megatron_m2d.sweep.report import write_reports
from megatron_m2d.validation import check_output

RESULTS = "results.jsonl"


@dataclass(frozen=True)
class Config:
    scoring: str
    grouping: str
    scaling: str
    select: int

    @property
    def key(self) -> str:
        return f"{self.scoring}|{self.grouping}|{self.scaling}|K{self.select}"


def grid(scorings, groupings, scalings, selects, groups: int, num_experts: int) -> list[Config]:
    for name, allowed, kind in ((scorings, SCORINGS, "scoring"), (groupings, GROUPINGS, "grouping"),
                                (scalings, SCALINGS, "scaling")):
        unknown = [v for v in name if v not in allowed]
        if unknown:
            raise M2DError(f"unknown {kind}(s): {', '.join(unknown)}")
    for select in selects:  # densify's own rule for K and k, so both commands refuse alike
        Method(scorings[0], select, groups).validate(num_experts)
    return [Config(*c) for c in itertools.product(scorings, groupings, scalings, selects)]


def load_results(out: Path) -> dict[str, dict]:
    path = out / RESULTS
    if not path.exists():
        return {}
    rows, kept = {}, []
    lines = path.read_text().splitlines()
    for line in lines:
        try:
            row = json.loads(line)
            rows[row["key"]] = row
            kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a row a killed run was writing: computed again
    if len(kept) != len(lines):
        write_text_atomically(path, "".join(line + "\n" for line in kept))
    return rows


def _apply_ffn(model, layer: int, ffn, layout: str) -> None:
    """Overwrite one layer's dense FFN in the loaded student (zero-padded to its width, as the export writes it)."""
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        if layout == "dense":
            for part in ("gate", "up", "down"):
                weight = getattr(mlp, f"{part}_proj").weight
                weight.copy_(zero_pad(getattr(ffn, part), tuple(weight.shape)))
        else:  # the one-expert student keeps transformers' fused expert stacks in memory, in their own layout
            for name, row in pack_expert(mlp.experts, ffn).items():
                getattr(mlp.experts, name)[0].copy_(row)


def sweep(model: str | Path, out: str | Path, scorings=tuple(SCORINGS), groupings=tuple(GROUPINGS),
          scalings=tuple(SCALINGS), selects: list[int] | None = None, groups: int | None = None,
          stats: str | Path | None = None, data: str | None = None, eval_data: str = "fixture",
          eval_tokens: int = 16384, seq_len: int = 256, kernel: KernelOptions = KernelOptions(), seed: int = 0,
          save_checkpoints: bool = False, calibration: dict | None = None, progress: bool = True,
          cp: str = "probability") -> list[dict]:
    out = Path(out)
    ckpt = Checkpoint(model)
    family = family_of(ckpt.config)
    groups = family.top_k(ckpt.config) if groups is None else groups
    selects = selects or [groups]
    configs = grid(scorings, groupings, scalings, selects, groups, family.num_experts(ckpt.config))
    if stats is None and data is None:
        raise M2DError("sweep needs --stats, or --data to calibrate first")
    check_output(out, [("--model", model), ("--stats", stats), ("--data", data), ("--eval-data", eval_data)])
    # a run refused before it has results or statistics leaves no folder behind
    with run_directory(out, resumable=lambda d: (d / RESULTS).exists() or (d / "stats" / META).exists()):
        if stats is None:
            stats = out / "stats"
            if not (stats / META).exists():
                calibrate(model, data, stats, progress=progress, **{"gram": True, **(calibration or {})})
        statistics = Statistics(stats)
        statistics.check_matches(model_fingerprint(ckpt, family), model)
        methods = {c.key: Method(c.scoring, c.select, groups, c.grouping, c.scaling, kernel=kernel, seed=seed,
                                 cp=cp) for c in configs}
        check_statistics_serve(statistics, list(methods.values()))
        return _sweep(ckpt, family, model, out, configs, methods, groups, statistics, stats, eval_data,
                      eval_tokens, seq_len, kernel, seed, save_checkpoints, progress, cp)


def _sweep(ckpt, family, model, out: Path, configs: list[Config], methods: dict[str, Method], groups: int,
           statistics: Statistics, stats, eval_data: str, eval_tokens: int, seq_len: int, kernel: KernelOptions,
           seed: int, save_checkpoints: bool, progress: bool, cp: str) -> list[dict]:
    settings = {"model": str(Path(model).resolve()), "stats": str(Path(stats).resolve()), "eval_data": eval_data,
                "eval_tokens": eval_tokens, "seq_len": seq_len, "groups": groups, "kernel": vars(kernel),
                "seed": seed, "cp": cp}
    previous = out / "sweep.json"
    if previous.exists() and json.loads(previous.read_text()).get("settings") != settings:
        raise M2DError(f"{out} holds a sweep made with other settings (model, statistics, evaluation, k, "
                       "kernel or seed); continue it with the same ones, or use another --out")
    write_text_atomically(previous, json.dumps({"settings": settings, "configurations": len(configs)}, indent=1)
                          + "\n")
    done = load_results(out)

    layout, _ = dense_width(family, ckpt.config, groups)
    # the student's architecture, loaded once: a fixed name, so a killed run's copy is replaced, not left behind
    scratch = out / ".student.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        first = methods[configs[0].key]
        write_dense(ckpt, family, make_plans(ckpt, family, statistics, first), first, scratch, progress=False)
        student, tokenizer = load_model(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tokens = token_stream(tokenizer, eval_data, eval_tokens, role="eval")  # tokenized once for all configs
    evaluate = lambda m: stream_perplexity(m, tokens, seq_len=seq_len)

    results = [done[c.key] for c in configs if c.key in done]
    pending = [c for c in configs if c.key not in done]
    started = time.perf_counter()
    computed: dict[tuple, str] = {tuple(r["effective"]): r["key"] for r in results}
    bar = tqdm(pending, desc="sweep", unit="config", disable=not progress, initial=len(results), total=len(configs))
    for config in bar:
        bar.set_postfix_str(config.key)
        # with K = k, groupings cannot differ: evaluate once, point the others at it
        effective = (config.scoring, "-" if config.select == groups else config.grouping, config.scaling, config.select)
        row = {"key": config.key, **vars(config), "groups": groups, "effective": effective}
        if effective in computed:
            twin = next(r for r in results if r["key"] == computed[effective])
            row.update(ppl=twin["ppl"], nll=twin["nll"], seconds=0.0, same_as=twin["key"])
        else:
            tick = time.perf_counter()
            method = methods[config.key]
            plans = make_plans(ckpt, family, statistics, method)
            for layer, plan in plans.items():
                _apply_ffn(student, layer, build_ffn(ckpt, family, plan, method, layout), layout)
            ckpt.release()
            score = evaluate(student)
            row.update(ppl=score["ppl"], nll=score["nll"], seconds=round(time.perf_counter() - tick, 3))
            computed[effective] = config.key
            if save_checkpoints:
                (out / "checkpoints").mkdir(exist_ok=True)
                densify(model, out / "checkpoints" / config.key.replace("|", "_"), config.scoring,
                        select=config.select, groups=groups, stats=stats, overwrite=True, progress=False,
                        grouping=config.grouping, scaling=config.scaling, kernel=kernel, seed=seed, cp=cp)
        row["effective"] = list(effective)
        with (out / RESULTS).open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        results.append(row)
    elapsed = time.perf_counter() - started
    teacher_model, _ = load_model(model)
    teacher = evaluate(teacher_model)
    del teacher_model
    write_reports(out, results, teacher["ppl"], elapsed)
    if progress:
        print(f"{len(configs)} configurations ({len({tuple(r['effective']) for r in results})} distinct) in "
              f"{elapsed:.0f} s this run; teacher ppl {teacher['ppl']:.2f}; tables and plots in {out}")
    return results
