"""Resumable training checkpoints: megatron-core distributed checkpoints of the student and its optimizer, plus the
scheduler, every RNG stream, the consumed-sample counts and the run config, published atomically.

    root/step_0000200/
        .metadata  *.distcp  common.pt  metadata.json     megatron-core `torch_dist`: student + optimizer
        m2d_convert.json  hf_side_files/                   as `m2d convert` writes them (tokenizer, densify card and
                                                           plan): the model keys are the converter's, so
                                                           `m2d convert megatron-to-hf` reads it
        train_state.json  run_config.json  rng/rank_*.json   ours, JSON (nothing here is ever unpickled)
        COMPLETE                                           written last, once every rank has reported success

A kill at any moment leaves the previous checkpoint intact (checkpoint_files.py: the directory protocol). The
teacher is never saved: modelopt hides it from the student's `sharded_state_dict`, and every save checks that
the model keys are exactly the converted student's. Reading goes through `convert.safe_load`, because
megatron-core's own loader unpickles what it reads.
"""

from __future__ import annotations

import datetime
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name

from megatron_m2d import __version__
from megatron_m2d.distillation.megatron import rng
from megatron_m2d.distillation.megatron.checkpoint_files import (CONFIG_FILE, RNG_DIR, STATE_FILE, check_student_keys,
                                                                 checkpoint_name, clean_leftovers, complete_checkpoints,
                                                                 publish, read_json, read_megatron_state, set_aside,
                                                                 write_json, write_student_files)
from megatron_m2d.distillation.megatron.coordination import (all_ranks_succeeded, barrier, broadcast_from_rank0,
                                                             rank, warn)
from megatron_m2d.errors import M2DError

FORMAT = "m2d-train/1"
# Megatron-LM's own choices: the distributed optimizer's state in its internal bucket layout (parallel save and
# load, no gathering; reshardable over data parallel only), no per-optimizer key prefix.
SHARDING = {"distrib_optim_sharding_type": "dp_reshardable", "chained_optim_avoid_prefix": True,
            "singleton_local_shards": False}
RECENT_STEPS = 100  # train losses averaged for the model card's final value
# Settings a resumed run may change without changing what its training steps compute (not `steps`: the dataset's
# sample order depends on the number of samples the run needs)
RESUMABLE_CHANGES = {"save_every", "keep_checkpoints", "eval_every", "eval_iters", "log_every", "tensorboard",
                     "wandb_project", "peak_tflops", "check_teacher", "export", "out", "make_vocab_size_divisible_by"}

@dataclass
class TrainState:
    """What the loop needs, beyond model/optimizer/scheduler/RNG, to continue exactly where it stopped."""
    step: int = 0  # optimizer steps done
    consumed_train_samples: int = 0  # the data order continues from here (the sampler counts samples)
    consumed_valid_samples: int = 0
    tokens: int = 0  # training tokens seen
    train: dict = field(default_factory=dict)  # last train metrics (kd_loss, lm_loss, ...)
    valid: dict = field(default_factory=dict)  # last validation metrics
    recent: dict = field(default_factory=dict)  # the last RECENT_STEPS values of each loss: the card's final loss
    extra: dict = field(default_factory=dict)  # anything else the loop keeps (JSON values)

    def record_train(self, values: dict) -> None:
        """The step's train metrics (call once per step): kept as `train`, and the losses in `recent`."""
        self.train = dict(values)
        for key in ("loss", "kd_loss", "lm_loss"):
            if key in values:
                self.recent[key] = (self.recent.get(key, []) + [float(values[key])])[-RECENT_STEPS:]

    def recent_mean(self, key: str) -> float | None:
        """Mean of the last (up to RECENT_STEPS) values of a train loss: one step's loss is one batch's noise."""
        values = self.recent.get(key) or []
        return sum(values) / len(values) if values else None

    @classmethod
    def from_json(cls, values: dict) -> "TrainState":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise M2DError(f"train state has unknown fields {unknown}")
        return cls(**values)


def _unwrap(model_chunks) -> list:
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(model_chunks))


def _sharded_state(model_chunks, optimizer, is_loading: bool) -> dict:
    """Megatron-LM's layout: `model` (or `model0`, `model1`... per virtual stage) and `optimizer`."""
    from megatron.core import parallel_state

    metadata = {**SHARDING, "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    chunks = _unwrap(model_chunks)
    state = {("model" if len(chunks) == 1 else f"model{i}"): chunk.sharded_state_dict(metadata=metadata)
             for i, chunk in enumerate(chunks)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


def _layout(optimizer) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return {"world": ps.get_data_parallel_world_size() * ps.get_tensor_model_parallel_world_size()
            * ps.get_pipeline_model_parallel_world_size(),
            "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
            "distributed_optimizer": any(isinstance(p, DistributedOptimizer) for p in parts)}


def save_checkpoint(root: str | Path, step: int, model_chunks, optimizer, scheduler, state: TrainState, config,
                    student_dir: str | Path) -> Path:
    """Collective (every rank calls it). Writes `root/step_NNNNNNN` atomically and keeps the newest
    `config.keep_checkpoints`. `student_dir`: the student's `m2d convert` directory (keys, provider config and
    side files come from there). Returns the checkpoint's path."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
    from megatron.core import parallel_state

    root, student_dir = Path(root), Path(student_dir)
    final, tmp = root / checkpoint_name(step), root / f".{checkpoint_name(step)}.tmp"
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    layout = _layout(optimizer)
    error = None
    try:
        # Megatron-LM's fully parallel save: replicas over data parallel share the writing
        strategy = FullyParallelSaveStrategyWrapper(TorchDistSaveShardedStrategy("torch_dist", 1),
                                                    parallel_state.get_data_parallel_group(with_context_parallel=True))
        dist_checkpointing.save(_sharded_state(model_chunks, optimizer, is_loading=False), str(tmp),
                                sharded_strategy=strategy)
        (tmp / RNG_DIR).mkdir(exist_ok=True)  # after megatron-core's save, which wants an empty directory
        write_json(tmp / RNG_DIR / f"rank_{rank():05d}.json", rng.capture())
        if rank() == 0:
            check_student_keys(tmp, student_dir)
            sizes = {"tp": layout["tp"], "pp": layout["pp"], "ep": 1, "vpp": layout["vpp"]}  # the student's
            write_student_files(tmp, student_dir, step, sizes)
            write_json(tmp / CONFIG_FILE, config.to_dict())
            write_json(tmp / STATE_FILE, {
                "format": FORMAT, "step": step, "m2d_version": __version__, "layout": layout,
                "sharding": SHARDING, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "train_state": asdict(state), "scheduler": scheduler.state_dict() if scheduler else None})
    except (Exception, CheckpointException) as e:  # reported by every rank below: none publishes a part
        error = e
    if not all_ranks_succeeded(error is None):
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, M2DError):
            raise error
        raise M2DError(f"saving {final} failed: {_reason(error)}") from None
    if rank() == 0:
        publish(tmp, final, max(1, int(config.keep_checkpoints)))
    barrier()
    return final


def _reason(error) -> str:
    """One line about a failure (DCP wraps each rank's exception with its traceback; torch's restricted
    unpickler names the refused global on a later line)."""
    if error is None:
        return "failed on another rank"
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    refused = [line for line in lines if "unsupported GLOBAL" in line or "Unsupported global" in line]
    text = (refused or lines or [""])[0][:240]
    if isinstance(error, M2DError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_layout(path: Path, saved: dict, now: dict) -> None:
    """The distributed optimizer's state reshards over data parallel only (its bucket layout depends on TP/PP)."""
    if saved.get("distributed_optimizer") and (saved["tp"], saved["pp"], saved.get("vpp")) != (
            now["tp"], now["pp"], now.get("vpp")):
        raise M2DError(f"{path} was written at TP {saved['tp']} / PP {saved['pp']} with the distributed optimizer, "
                       f"whose state reshards over data parallel only; resume with --tp {saved['tp']} "
                       f"--pp {saved['pp']}")


def _read(path: Path, model_chunks, optimizer, layout: dict):
    """Everything in one checkpoint, read but not applied (a failure leaves the run's state to the next try)."""
    meta = read_json(path / STATE_FILE)
    if meta.get("format") != FORMAT:
        raise M2DError(f"format {meta.get('format')!r}, this version reads {FORMAT!r}")
    rng_file = path / RNG_DIR / f"rank_{rank():05d}.json"
    same_world = meta["layout"]["world"] == layout["world"]
    rng_state = read_json(rng_file) if same_world else None
    loaded = read_megatron_state(path, _sharded_state(model_chunks, optimizer, is_loading=True))
    return meta, loaded, rng_state


def without_pickled_extra_state(model_state: dict) -> tuple[dict, int]:
    """The model state without the extra states Transformer Engine (and modelopt) would unpickle: their
    `set_extra_state` runs `pickle.loads` on the stored bytes, so a crafted checkpoint would run code there. The
    FP8 scaling state (amax history, scales) therefore starts fresh after a resume and refills within the
    recipe's amax-history length; the local spec's extra states are None and pass. Returns (state, dropped)."""
    kept = {k: v for k, v in model_state.items() if not (k.endswith("_extra_state") and v is not None)}
    return kept, len(model_state) - len(kept)


def _apply(meta: dict, loaded: dict, rng_state, model_chunks, optimizer, scheduler) -> TrainState:
    chunks = _unwrap(model_chunks)
    dropped = 0
    for i, chunk in enumerate(chunks):
        state, count = without_pickled_extra_state(loaded["model" if len(chunks) == 1 else f"model{i}"])
        dropped += count
        missing, unexpected = chunk.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]  # TE's FP8 metadata may start fresh
        if missing or unexpected:
            raise M2DError(f"checkpoint does not fit the student (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if rng_state is not None:
        rng.restore(rng_state)
    if dropped:
        warn(f"{dropped} Transformer Engine extra states (FP8 scaling history) not restored: TE unpickles them, "
             "and m2d never unpickles checkpoint bytes; FP8 scales start fresh")
    return TrainState.from_json(meta["train_state"])


def _warn_changed_settings(path: Path, config) -> None:
    saved = read_json(path / CONFIG_FILE)
    now = config.to_dict()
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        warn(f"resuming {path.name} with changed settings {', '.join(changed)}: the continuation differs from the "
             "run that wrote it")


def load_latest_checkpoint(root: str | Path, model_chunks, optimizer, scheduler, config=None) -> TrainState | None:
    """Collective. Restores the newest complete checkpoint under `root` into the (freshly built) model chunks,
    optimizer and scheduler, and the RNG streams; returns its TrainState, or None when there is none. An
    unreadable checkpoint is set aside (`.step_N.unreadable`) with a one-line warning and the one before is
    tried. `config`, when given, is compared with the checkpoint's run config (a one-line warning per resume
    when settings that change the continuation differ)."""
    root = Path(root)
    if rank() == 0 and root.is_dir():
        clean_leftovers(root)
    candidates = [Path(p) for p in broadcast_from_rank0(
        [str(p) for p in reversed(complete_checkpoints(root))] if rank() == 0 else None)]
    layout = _layout(optimizer)
    for i, path in enumerate(candidates):
        error, meta = None, None
        try:
            meta, loaded, rng_state = _read(path, model_chunks, optimizer, layout)
        except (Exception, CheckpointException) as e:  # "unreadable": agreed below, the one before tried
            error = e
        if all_ranks_succeeded(error is None):
            _check_layout(path, meta["layout"], layout)
            if meta["layout"]["world"] != layout["world"]:
                warn(f"{path.name} was written by {meta['layout']['world']} ranks, this run has {layout['world']}: "
                     "RNG streams start from the seed")
            if config is not None:
                _warn_changed_settings(path, config)
            return _apply(meta, loaded, rng_state, model_chunks, optimizer, scheduler)
        following = f"resuming from {candidates[i + 1].name}" if i + 1 < len(candidates) else "no older checkpoint"
        warn(f"checkpoint {path.name} is unreadable ({_reason(error)}); {following}; set aside as "
             f".{path.name}.unreadable")
        if rank() == 0:
            set_aside(path, "unreadable")
        barrier()
    if candidates:
        raise M2DError(f"no readable checkpoint under {root} (each was set aside as .step_N.unreadable); "
                       "move them back or start from a new --out")
    return None
