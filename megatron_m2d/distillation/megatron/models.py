"""The student and the frozen teacher of a run, built from `m2d convert` checkpoints and joined by nvidia-modelopt.

Both models come from their checkpoint's provider config (`convert.provider`) at the run's TP/PP: the dense
student with expert parallel size 1, the MoE teacher with --teacher-ep and expert tensor parallel 1 (MoE parallel
folding), its routers at --teacher-top-k, never FP8. modelopt's kd_loss mode attaches the teacher to the student
(`mtd.convert`), `adjust_distillation_model_for_mcore` hides it from checkpoints and passes both models'
activations between pipeline stages, and our chunked criterion (loss.py) reads the two output layers' logits.
The student is then wrapped as Megatron-LM wraps a model it trains: Float16Module (bf16), DDP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MethodType

import torch

from megatron_m2d.convert.megatron_model import te_available, transformer_config_kwargs
from megatron_m2d.convert.parallel import ParallelSizes
from megatron_m2d.convert.provider import load_checkpoint, model_provider, read_provider_config
from megatron_m2d.distillation.megatron.config import RunConfig
from megatron_m2d.distillation.megatron.inputs import ModelInput
from megatron_m2d.distillation.megatron.parallel import Layout
from megatron_m2d.errors import M2DError


@dataclass
class Models:
    chunks: list  # what the schedule runs and the optimizer updates: [DDP(Float16Module(distillation model))]
    distillation: torch.nn.Module  # the student, converted in place by modelopt into its DistillationModel
    teacher: torch.nn.Module
    student_config: object  # the student's TransformerConfig (the schedule's config)
    vocab_size: int  # the real vocabulary; the output layers hold vocab_rows >= it
    vocab_rows: int
    uses_te: bool


def check_pair(config: RunConfig, student: ModelInput, teacher: ModelInput) -> None:
    """One-line errors for a teacher and student that cannot be distilled into each other at this layout (read
    from their configs and tokenizers: nothing converted or loaded yet)."""
    s_kwargs, t_kwargs = transformer_config_kwargs(student.hf_config), transformer_config_kwargs(teacher.hf_config)
    if s_kwargs.get("num_moe_experts", 1) != 1:
        raise M2DError(f"the student {student.path} is a MoE model; the engine trains dense students (and the "
                       "one-expert layout densify writes for GPT-OSS and OLMoE)")
    if s_kwargs.get("num_moe_experts") and config.teacher_ep > 1:  # one expert-parallel size serves both models
        raise M2DError(f"a one-expert student ({student.path}) cannot sit beside an expert-parallel teacher: "
                       "megatron-core gives both models the same expert-parallel groups; use --teacher-ep 1")
    if student.hf_config.vocab_size != teacher.hf_config.vocab_size:
        raise M2DError(f"teacher and student vocabularies differ ({teacher.hf_config.vocab_size} vs "
                       f"{student.hf_config.vocab_size} tokens)")
    if student.vocab_rows != teacher.vocab_rows:
        raise M2DError(f"teacher and student vocabularies are padded differently ({teacher.vocab_rows} vs "
                       f"{student.vocab_rows} rows): convert both with the same --make-vocab-size-divisible-by")
    _check_tokenizers(student.tokenizer_dir, teacher.tokenizer_dir)
    for role, kwargs, ep, rows in (("student", s_kwargs, 1, student.vocab_rows),
                                   ("teacher", t_kwargs, config.teacher_ep, teacher.vocab_rows)):
        problems = ParallelSizes(config.tp, config.pp, ep).problems(kwargs, rows)
        if problems:
            raise M2DError(f"{role}: {'; '.join(problems)}")
    experts = t_kwargs.get("num_moe_experts")
    if config.teacher_top_k and not experts:
        raise M2DError("--teacher-top-k needs a MoE teacher")
    if config.teacher_top_k and config.teacher_top_k > experts:
        raise M2DError(f"--teacher-top-k {config.teacher_top_k} exceeds the teacher's {experts} experts")
    if experts and config.tp > 1 and config.sequence_parallel is False:
        raise M2DError("a MoE teacher under --tp > 1 needs sequence parallelism (megatron-core); "
                       "drop --sequence-parallel false")
    sequence_parallel = config.tp > 1 and config.sequence_parallel is not False
    if sequence_parallel and config.seq_len % config.tp:
        raise M2DError(f"--seq-len {config.seq_len} does not split over --tp {config.tp} (sequence parallel)")
    tokens = config.micro_batch * (config.seq_len // config.tp if sequence_parallel else config.seq_len)
    if config.fp8 and tokens % 16:  # FP8 GEMMs need it (TransformerEngine #1422)
        raise M2DError(f"--fp8 needs a multiple of 16 tokens per rank and micro-batch; --micro-batch "
                       f"{config.micro_batch} x --seq-len {config.seq_len}{' / --tp' if sequence_parallel else ''} "
                       f"gives {tokens}")


def _check_tokenizers(student_dir: Path, teacher_dir: Path) -> None:
    """Equal vocabulary sizes are not enough: the same ids must mean the same tokens."""
    from megatron_m2d.io.checkpoint import load_tokenizer

    try:
        student, teacher = load_tokenizer(student_dir).get_vocab(), load_tokenizer(teacher_dir).get_vocab()
    except M2DError:  # a model without tokenizer files: the vocabulary sizes were compared
        return
    if student != teacher:
        differing = sorted(set(student.items()) ^ set(teacher.items()))[:2]
        raise M2DError(f"teacher and student tokenizers differ (e.g. {differing})")


def _training_overrides(config: RunConfig, layout: Layout) -> tuple[dict, dict]:
    """TransformerConfig fields of the run, (student's, teacher's)."""
    bf16 = config.precision == "bf16"
    sequence_parallel = layout.tp > 1 if config.sequence_parallel is None else config.sequence_parallel
    # perform_initialization stays on although the checkpoints overwrite every weight: megatron-core marks its
    # tensor-parallel weights (what the gradient norm and the optimizer go by) only while initialising them
    common = dict(bf16=bf16, sequence_parallel=sequence_parallel, use_cpu_initialization=not torch.cuda.is_available(),
                  cross_entropy_loss_fusion=False,  # TE's fused CE overwrites the logits the KD loss reads
                  calculate_per_token_loss=False)  # each micro-batch averaged, as the HF backend does
    # expert tensor parallel 1 for both: the parallel state's (a one-expert student has a MoE layer too)
    student = dict(common, fp8=config.fp8, fp8_recipe=config.fp8_recipe if config.fp8 else "delayed",
                   expert_tensor_parallel_size=1)
    if config.recompute == "selective":
        student.update(recompute_granularity="selective")
    elif config.recompute == "full":
        student.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    # the teacher inherits nothing of the student's FP8 or recompute (Megatron-LM and Bridge let it inherit FP8)
    teacher = dict(common, fp8=None, expert_tensor_parallel_size=1)
    if config.teacher_top_k:
        teacher["moe_router_topk"] = config.teacher_top_k
    return student, teacher


def _no_language_model_loss(self, labels, logits):
    """megatron-core's cross-entropy materialises fp32 copies of the whole vocabulary; the KD criterion computes
    the LM loss from the captured logits instead, in bounded memory, in training and validation alike."""
    return torch.zeros_like(labels, dtype=logits.dtype)


def build_models(config: RunConfig, layout: Layout, student_dir: Path, teacher_dir: Path,
                 device: torch.device) -> Models:
    """This rank's stage of the student (trainable, wrapped) and of the teacher (frozen), weights loaded."""
    import modelopt.torch.distill as mtd
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module
    from modelopt.torch.distill.plugins.megatron import DistillationConfig, adjust_distillation_model_for_mcore

    from megatron_m2d.distillation.megatron.loss import chunked_kd_criterion

    if config.precision == "bf16" and not torch.cuda.is_available():
        raise M2DError("--precision bf16 needs a GPU (megatron-core's mixed-precision optimizer); "
                       "use --precision fp32 on a machine without one")
    student_provider = read_provider_config(student_dir)
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    uses_te = te_available()
    student_fields, teacher_fields = _training_overrides(config, layout)
    try:
        student = model_provider(student_dir, dtype, use_te=uses_te, sizes=ParallelSizes(layout.tp, layout.pp, 1),
                                 config_overrides=student_fields)()
        teacher = model_provider(teacher_dir, dtype, use_te=uses_te,
                                 sizes=ParallelSizes(layout.tp, layout.pp, layout.teacher_ep),
                                 config_overrides=teacher_fields)()
    except AssertionError as e:
        if "sequence parallel not supported by torch" in str(e):  # the local spec without TE and apex
            raise M2DError("sequence parallelism (--tp > 1) needs Transformer Engine or NVIDIA apex: "
                           "megatron-core's fallback torch norm cannot split the sequence") from None
        raise
    load_checkpoint(student, student_dir)
    load_checkpoint(teacher, teacher_dir)
    student.to(device), teacher.to(device).eval()

    vocab_size = student_provider.hf_config.vocab_size
    criterion = {}
    if parallel_state.is_pipeline_last_stage():  # the logits exist on the last stage only
        criterion[("output_layer", "output_layer")] = chunked_kd_criterion(student.config, config.temperature,
                                                                           vocab_size)
    distillation = mtd.convert(student, mode=[("kd_loss", {"teacher_model": teacher, "criterion": criterion,
                                                           "loss_balancer": None})])
    adjust_distillation_model_for_mcore(distillation, DistillationConfig(skip_lm_loss=True, criterion=criterion))
    distillation.compute_language_model_loss = MethodType(_no_language_model_loss, distillation)

    module = Float16Module(student.config, distillation) if dtype == torch.bfloat16 else distillation
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=use_distributed_optimizer(config),
                                               check_for_nan_in_grad=True)
    wrapped = DistributedDataParallel(student.config, ddp_config, module)
    return Models([wrapped], distillation, teacher, student.config, vocab_size, student_provider.vocab_rows, uses_te)


def use_distributed_optimizer(config: RunConfig) -> bool:
    """megatron-core's distributed optimizer (state sharded over DP) wherever it can run: it needs CUDA."""
    if config.use_distributed_optimizer and not torch.cuda.is_available():
        raise M2DError("--use-distributed-optimizer needs CUDA (megatron-core's distributed optimizer)")
    return torch.cuda.is_available() if config.use_distributed_optimizer is None else config.use_distributed_optimizer
