"""Before the first step: is the loaded teacher the model its HF checkpoint is?

A teacher that silently loads as zeros or random weights (Megatron-Bridge #1422) still trains a student, into
garbage. The Megatron teacher runs a few tokens through the run's own pipeline; the rank that holds its gathered
logits compares them with transformers' logits of the HF checkpoint the teacher was converted from (streamed one
decoder layer at a time, so a 30B teacher needs one layer of memory), at the same router top-k.

The measure is the relative RMS difference of the per-token centred logits (softmax is blind to a per-token
shift). A teacher loaded correctly differs from transformers by rounding: ~1e-5 in fp32, ~1e-2 in bf16 across
dozens of layers. Zero weights give 1, random weights ~1.4; TOLERANCE sits between with a wide margin.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from megatron_m2d.errors import M2DError

SAMPLE_TOKENS = 32
TOLERANCE = 0.25


def sample_ids(vocab_size: int, length: int, seed: int = 1234) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def check_teacher(teacher, teacher_dir: Path, vocab_size: int, tp: int, top_k: int | None, device,
                  uses_te: bool) -> str:
    """The teacher's logits against its HF checkpoint's; a one-line M2DError on every rank when they disagree,
    are constant (zero weights) or not finite. Returns what was checked, for the log."""
    from megatron.core import parallel_state as ps

    from megatron_m2d.distillation.megatron.parallel import on_one_rank, rank_where

    length = -(-SAMPLE_TOKENS // tp) * tp  # sequence parallel splits the sequence over TP ranks
    ids = sample_ids(vocab_size, length)
    logits = teacher_logits(teacher, ids, device, uses_te)
    holder = rank_where(ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                        and ps.get_data_parallel_rank() == 0)
    return on_one_rank(lambda: judge(logits[..., :vocab_size], teacher_dir, ids, top_k), rank=holder)


def judge(logits: torch.Tensor, teacher_dir: Path, ids: torch.Tensor, top_k: int | None) -> str:
    if not torch.isfinite(logits).all():
        raise M2DError(f"the teacher {teacher_dir} gives non-finite logits: its checkpoint is corrupted")
    if float(logits.std(dim=-1).max()) < 1e-6:
        raise M2DError(f"the teacher {teacher_dir} gives the same logit for every token (its weights loaded as "
                       "zeros?)")
    source = _hf_source(teacher_dir)
    if source is None:
        return f"teacher logits finite and varied; no HF checkpoint at hand to compare with ({teacher_dir})"
    try:
        reference = hf_reference_logits(source, ids, top_k)
    except M2DError as e:
        return f"teacher logits finite and varied; no HF comparison ({e})"
    difference = relative_difference(logits, reference)
    if not difference < TOLERANCE:
        raise M2DError(f"the teacher {teacher_dir} does not compute what its HF checkpoint {source} computes "
                       f"(relative logit difference {difference:.3f} > {TOLERANCE}): zeros or random weights "
                       "loaded? convert it again")
    return f"teacher logits match {source} (relative difference {difference:.2e} on {ids.shape[1]} tokens)"


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.double(), expected.double()
    got = got - got.mean(-1, keepdim=True)
    expected = expected - expected.mean(-1, keepdim=True)
    return float((got - expected).norm() / expected.norm().clamp(min=1e-12))


def _hf_source(teacher_dir: Path) -> Path | None:
    """The HF directory the teacher was converted from, where it still exists."""
    from megatron_m2d.convert.provider import META

    try:
        source = json.loads((Path(teacher_dir) / META).read_text()).get("source")
    except (OSError, json.JSONDecodeError):
        return None
    return Path(source) if source and (Path(source) / "config.json").is_file() else None


def teacher_logits(teacher, ids: torch.Tensor, device, uses_te: bool) -> torch.Tensor | None:
    """The teacher's logits of `ids` [1, s] over the whole padded vocabulary (fp32, CPU) on the last pipeline
    stage, None on the others; every rank of the model takes part (pipeline and tensor parallel)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_m2d.distillation.megatron.loop import attention_mask

    tokens = ids.to(device)
    positions = torch.arange(ids.shape[1], device=device)[None]
    mask = attention_mask(ids.shape[1], device, uses_te)

    def forward_step(data_iterator, model):
        next(data_iterator)
        return model(tokens, positions, mask), None

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[teacher], num_microbatches=1,
            seq_length=ids.shape[1], micro_batch_size=1, forward_only=True)
    for module in teacher.modules():  # modelopt's hook kept the output layer's logits for a KD loss: drop them
        if getattr(module, "_intermediate_output", None) is not None:
            module._intermediate_output = None
    if not ps.is_pipeline_last_stage():
        return None
    return gather_from_tensor_model_parallel_region(outputs[0]).float().cpu()


def hf_reference_logits(source: Path, ids: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """transformers' logits of `ids`, one decoder layer in memory at a time (calibration's streamer)."""
    from transformers import AutoModelForCausalLM

    from megatron_m2d.calibration.streaming import LayerStreamer
    from megatron_m2d.families import family_of
    from megatron_m2d.io.checkpoint import Checkpoint

    ckpt = Checkpoint(source)
    moe = any(hasattr(ckpt.config, n) for n in ("num_experts", "num_local_experts", "n_routed_experts"))
    streamer = LayerStreamer(ckpt, family_of(ckpt.config) if moe else None, "cpu", torch.float32)
    if top_k:
        streamer.config.num_experts_per_tok = top_k  # every family's routers read it when a layer is built
    hidden, kwargs = streamer.embed(ids)
    states = [hidden]
    for index in range(ckpt.config.num_hidden_layers):
        streamer.forward_layer(streamer.load_layer(index), index, states, [kwargs])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(ckpt.config))
    norm = skeleton.model.norm
    norm.load_state_dict({"weight": ckpt.get("model.norm.weight").float()}, assign=True)
    tied = getattr(ckpt.config, "tie_word_embeddings", False)
    head = ckpt.get("model.embed_tokens.weight" if tied else "lm_head.weight").float()
    with torch.no_grad():
        return norm(states[0]) @ head.t()
