"""Training data for the Megatron engine: megatron-core's GPTDataset + BlendedMegatronDatasetBuilder over indexed
datasets (`m2d preprocess`), with what the wheel lacks around them written small.

- `megatron_tokenizer(hf_dir)`: the tokenizer object GPTDataset reads (vocab_size, eod, pad, unique_identifiers).
- `build_datasets(config, tokenizer) -> (train, valid)`: weighted blends of prefixes, a train/valid/test split and
  a sample order fixed by the seed; the dataset index cache lives in the run directory (megatron-core's default
  is beside the data: inputs are never written). Every rank calls it (the builder has barriers); the datasets
  exist on tensor-parallel rank 0 only (None elsewhere), which reads and broadcasts each batch (`batches.py`).
- `MicroBatches` (batches.py): the consumed-samples sampler and the tensor-parallel broadcast.

Samples are packed `seq_len` tokens with their next-token labels, causal attention implied (no s x s masks:
megatron-core's default builds one per sample), no position or attention resets at document ends and no loss
masking of the end-of-document token: the HF backend trains on its data the same way.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

from megatron_m2d.distillation.megatron.batches import MicroBatches  # noqa: F401  (the engine's entry point)
from megatron_m2d.distillation.megatron.indexed import IndexSummary, check_prefix, normalize_prefix
from megatron_m2d.distillation.megatron.preprocess import read_summary, tokenizer_fingerprint
from megatron_m2d.errors import M2DError
from megatron_m2d.io.checkpoint import load_tokenizer

CACHE_DIR = "dataset-cache"
SIDE_FILES_DIR = "hf_side_files"  # where `m2d convert hf-to-megatron` keeps the HF tokenizer files


class DatasetTokenizer:
    """The tokenizer as megatron-core's datasets read it, around the student's HF tokenizer. Written here rather
    than taken from megatron.core.tokenizers: its HuggingFaceTokenizer defaults to slow tokenizers, encodes
    through tokenize() + convert_tokens_to_ids rather than the tokenizer's own __call__ (which every other m2d
    stage and transformers' inference use), and keys the dataset cache on the tokenizer's path, not its content."""

    def __init__(self, hf_tokenizer, source: str = ""):
        if hf_tokenizer.eos_token_id is None:
            raise M2DError(f"the tokenizer of {source} has no end-of-text (eos) token to separate documents")
        self.hf = hf_tokenizer
        self.fingerprint = tokenizer_fingerprint(hf_tokenizer)
        self.vocab_size = self.fingerprint["vocab_size"]
        self.eod = self.eos = hf_tokenizer.eos_token_id
        self.bos = hf_tokenizer.bos_token_id
        # No id of our data is padding (preprocess never writes pads), so none may be masked or remapped as one:
        # megatron-core's own "no pad" sentinel. (Qwen's pad equals its eod: taken as pad, every document end
        # would drop out of the loss; megatron-core resets it to -1 too, with a warning.)
        self.pad = -1
        self.unique_identifiers = OrderedDict([("class", "m2d.DatasetTokenizer"), *self.fingerprint.items()])

    def tokenize(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids) -> str:
        return self.hf.decode(list(ids))


def megatron_tokenizer(hf_dir: str | Path) -> DatasetTokenizer:
    """The student's tokenizer (tokenizer.json or a sentencepiece tokenizer.model) from its HF directory, or from
    a directory `m2d convert hf-to-megatron` wrote."""
    path = Path(hf_dir)
    side = path / SIDE_FILES_DIR
    return DatasetTokenizer(load_tokenizer(side if side.is_dir() else path), str(hf_dir))


def parse_blend(data) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights or None) from "PREFIX", "0.7 P1 0.3 P2", ["P1", "P2"], [0.7, "P1", 0.3, "P2"] or
    {"prefixes": [...], "weights": [...]}. Without weights, prefixes are drawn in proportion to their size.
    Written here: megatron-core's get_blend_from_list asserts instead of explaining, and misreads some mixes."""
    if isinstance(data, dict):
        unknown = set(data) - {"prefixes", "weights"}
        if unknown or "prefixes" not in data:
            raise M2DError("data: a mapping needs 'prefixes' (and optionally 'weights'), got keys "
                           f"{sorted(map(str, data))}")
        prefixes, weights = list(data["prefixes"]), data.get("weights")
    else:
        items = data.split() if isinstance(data, str) else list(data or [])
        weighted = bool(items) and _is_number(items[0])
        weights = [items[i] for i in range(0, len(items), 2)] if weighted else None
        prefixes = [items[i] for i in range(1, len(items), 2)] if weighted else items
        if weighted and len(items) % 2:
            raise M2DError(f"data: weights and prefixes must alternate (WEIGHT PREFIX ...), got {len(items)} items")
    if not prefixes or not all(isinstance(p, (str, os.PathLike)) and not _is_number(p) for p in prefixes):
        raise M2DError(f"data: expected dataset prefixes (optionally weighted: 0.7 P1 0.3 P2), got {data!r}")
    if weights is not None:
        if len(weights) != len(prefixes) or not all(_is_number(w) for w in weights):
            raise M2DError(f"data: one number per prefix expected as weights, got {weights!r}")
        weights = [float(w) for w in weights]
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise M2DError(f"data: weights must be positive and finite, got {weights}")
        if len(prefixes) == 1:
            weights = None  # one prefix: a weight means nothing (megatron-core would warn about a 1-way blend)
    return [normalize_prefix(p) for p in prefixes], weights


def _is_number(item) -> bool:
    if isinstance(item, bool):
        return False
    if isinstance(item, (int, float)):
        return True
    try:
        float(item)
        return True
    except (TypeError, ValueError):
        return False


def parse_split(split: str) -> str:
    """"98,2,0" checked, and written as megatron-core parses it: three plain decimals (its parser reads digits and
    dots only, so "1e-3" would silently become other shares)."""
    parts = [part.strip() for part in str(split).split(",")]
    try:
        shares = [float(part) for part in parts]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or not all(math.isfinite(s) and s >= 0 for s in shares) or shares[0] <= 0:
        raise M2DError(f"split: expected up to three non-negative shares 'train,valid,test' with train > 0 "
                       f"(e.g. 98,2,0), got {split!r}")
    shares += [0.0] * (3 - len(shares))
    return ",".join(f"{share / sum(shares):.15f}" for share in shares)


def split_ranges(split: str, documents: int) -> list[tuple[int, int] | None]:
    """[first, last) documents of each split of a prefix, dealt exactly as megatron-core deals them."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    return [None if bounds is None else (int(round(bounds[0] * documents)), int(round(bounds[1] * documents)))
            for bounds in convert_split_vector_to_split_matrix(parse_and_normalize_split(split))]


def samples_needed(steps: int, global_batch: int, eval_every: int, eval_iters: int) -> tuple[int, int]:
    """(train, valid) samples a run draws: one global batch per step; eval_iters global batches per evaluation,
    every eval_every steps and at the end, each on fresh validation samples (as Megatron-LM counts them)."""
    evaluations = steps // eval_every + 1 if eval_every > 0 and eval_iters > 0 else 0
    return steps * global_batch, evaluations * eval_iters * global_batch


def build_datasets(config, tokenizer: DatasetTokenizer):
    """(train, valid) GPTDataset/BlendedDataset for a RunConfig (fields data, split, seq_len, seed, steps,
    global_batch, eval_every, eval_iters, out). valid is None when the run never evaluates."""
    train_samples, valid_samples = samples_needed(config.steps, config.global_batch, config.eval_every or 0,
                                                  config.eval_iters or 0)
    return build_gpt_datasets(config.data, config.split, config.seq_len, config.seed, train_samples,
                              valid_samples, Path(config.out) / CACHE_DIR, tokenizer)


def build_gpt_datasets(data, split: str, seq_len: int, seed: int, train_samples: int, valid_samples: int,
                       cache_dir: str | Path, tokenizer: DatasetTokenizer):
    """Every rank calls this, after torch.distributed and megatron-core's parallel state are initialized."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_blend(data)
    shares = parse_split(split)
    if valid_samples > 0 and split_ranges(shares, 1000)[1] is None:
        raise M2DError(f"the run evaluates but split {split!r} leaves no validation share (e.g. 98,2,0)")
    for prefix in prefixes:  # on every rank, so a bad prefix stops all ranks alike (no hang at a barrier)
        index = check_prefix(prefix)
        _check_tokenizer(prefix, tokenizer)
        _check_split_sizes(index, shares, seq_len, {0: train_samples, 1: valid_samples}, split)
    cache_dir = Path(cache_dir)
    if _rank() == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        from megatron_m2d.distillation.megatron.cache import drop_unreadable_indices

        drop_unreadable_indices(cache_dir)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len, blend=(prefixes, weights), split=shares,
        path_to_cache=str(cache_dir), tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], _is_tensor_parallel_source, config).build()
    return train, (valid if valid_samples > 0 else None)


def _check_tokenizer(prefix: str, tokenizer: DatasetTokenizer) -> None:
    summary = read_summary(prefix)
    if summary is None:  # made by another tool: MicroBatches still refuses ids outside the vocabulary
        return
    theirs, ours = summary.get("tokenizer"), tokenizer.fingerprint
    theirs = theirs if isinstance(theirs, dict) else {}
    if theirs != ours:
        how = "the same size but other tokens" if theirs.get("vocab_size") == ours["vocab_size"] else \
            f"vocabulary {theirs.get('vocab_size')}, eod {theirs.get('eod')}"
        raise M2DError(f"data prefix {prefix} was tokenized with another tokenizer ({how}) than the student's "
                       f"(vocabulary {ours['vocab_size']}, eod {ours['eod']}): run `m2d preprocess` again with "
                       "the student's tokenizer")


def _check_split_sizes(index: IndexSummary, shares: str, seq_len: int, needed: dict, split: str) -> None:
    """A split that must deliver samples needs at least one sample's worth of tokens (seq_len + 1): with none,
    megatron-core's epoch count loops forever."""
    for number, bounds in enumerate(split_ranges(shares, index.documents)):
        if needed.get(number, 0) <= 0 or bounds is None:
            continue
        tokens = index.tokens(*bounds)
        if tokens < seq_len + 1:
            name = ("train", "valid", "test")[number]
            raise M2DError(f"data prefix {index.prefix}: its {name} share of split {split!r} holds "
                           f"{bounds[1] - bounds[0]} of {index.documents} documents, {tokens} tokens: fewer than one "
                           f"sample of {seq_len} + 1 (more data, a larger {name} share or a shorter seq_len)")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _is_tensor_parallel_source() -> bool:
    """Datasets are built where batches are read: tensor-parallel rank 0 (the others receive broadcasts)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return True
    return parallel_state.get_tensor_model_parallel_rank() == 0
