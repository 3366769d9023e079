"""lm-eval harness tasks on our HF outputs (MoE teachers and dense students load as plain HF models).

Benchmark datasets download from the hub; offline, point `include_path` at YAML tasks over local JSON files
(`examples/tasks/` has one), which is also how the integration is tested.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from megatron_m2d.errors import M2DError, one_line
from megatron_m2d.io.model_card import Evaluation


def run_tasks(model_dir, tasks: list[str], include_path: str | None = None, limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 8, device: str = "cpu") -> dict[str, dict]:
    """{task: {metric: value}} from lm-eval's `simple_evaluate` with its HF backend."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise M2DError("lm-eval is not installed: pip install 'megatron_m2d[eval]'") from None
    include_path = str(Path(include_path).resolve()) if include_path else None
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise M2DError(f"unknown lm-eval task(s): {', '.join(unknown)}"
                       + ("" if include_path else " (local YAML tasks need --include-path)"))
    model_dir = Path(model_dir).resolve()
    # datasets resolves a task's relative data_files against the working directory: run inside the task
    # folder so that local YAML tasks can name their JSON files relative to themselves.
    try:
        with contextlib.chdir(include_path or "."):
            results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                              tasks=tasks, task_manager=manager, limit=limit,
                                              num_fewshot=num_fewshot, batch_size=batch_size, device=device)
    except Exception as exc:  # noqa: BLE001 -- lm-eval and the hub raise anything; offline is the usual cause
        raise M2DError(f"lm-eval could not run {', '.join(tasks)}: {one_line(exc, 200)} (offline? hub tasks "
                       "download their data; local YAML tasks run with --include-path)") from None
    return {task: {metric.split(",")[0]: value for metric, value in scores.items()
                   if isinstance(value, (int, float)) and not metric.startswith("alias")}
            for task, scores in results["results"].items()}


def as_evaluations(results: dict[str, dict], num_fewshot: int | None, limit: int | None) -> list[Evaluation]:
    """lm-eval metrics as model-card evaluations (stderr values go into the 'how' column, not a row of their own)."""
    import lm_eval

    made = []
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or metric == "sample_len":
                continue
            how = f"lm-eval {lm_eval.__version__}, {num_fewshot or 0}-shot"
            how += f", first {limit} items" if limit else ""
            if f"{metric}_stderr" in metrics:
                how += f", stderr {metrics[f'{metric}_stderr']:.4f}"
            made.append(Evaluation(metric=metric, value=value, dataset=task, dataset_name=task, details=how))
    return made
