"""`m2d convert`: HF <-> Megatron-Core distributed checkpoints (needs megatron-core; the rest of m2d does not)."""

from __future__ import annotations

from megatron_m2d.cli.common import is_main_process
from megatron_m2d.errors import M2DError


def register(commands) -> None:
    p = commands.add_parser("convert", help="HF <-> Megatron-Core distributed checkpoint (needs megatron-core)")
    p.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"], help="which way to convert")
    p.add_argument("--model", required=True, help="HF directory (hf-to-megatron), or a Megatron checkpoint: "
                   "converted, saved by Megatron training, or a distillation checkpoint (step_N: its model card "
                   "adds the distillation record)")
    for flag, what in (("--tp", "tensor"), ("--pp", "pipeline"), ("--ep", "expert")):
        p.add_argument(flag, type=int, default=1, help=f"target {what} parallel size (checked against the model; "
                       "one process writes a checkpoint that loads at any size, torchrun with tp*pp*ep ranks "
                       "writes this layout)")
    p.add_argument("--vpp", type=int, default=None,
                   help="virtual pipeline stages per pipeline rank (default: none, one stage per rank)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the Megatron vocabulary to a multiple of this (must be divisible by --tp)")
    p.add_argument("--out", required=True, help="directory to write: a torch_dist checkpoint, or a HF checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=run_convert)


def require_megatron_core() -> None:
    """A one-line error where megatron-core is missing; its import notices silenced (none matters to m2d)."""
    import importlib.util
    import warnings

    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise M2DError("megatron-core is not installed: pip install 'megatron_m2d[megatron]'")
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine and Apex) (is|are) not installed.*")
    warnings.filterwarnings("ignore", message=r".*cuda_graph.*")


def run_convert(args) -> None:
    require_megatron_core()
    from megatron_m2d.convert import checkpoint

    if args.direction == "hf-to-megatron":
        from megatron_m2d.convert.parallel import ParallelSizes

        sizes = ParallelSizes(tp=args.tp, pp=args.pp, ep=args.ep, vpp=args.vpp)
        out = checkpoint.hf_to_megatron_checkpoint(args.model, args.out, sizes, args.overwrite,
                                                   vocab_divisible_by=args.make_vocab_size_divisible_by)
    else:
        from megatron_m2d.distillation.megatron import export

        if export.is_training_checkpoint(args.model):  # a distillation checkpoint: its card adds the record
            out = export.export_student(args.model, args.out, overwrite=args.overwrite)
        else:
            out = checkpoint.megatron_to_hf_checkpoint(args.model, args.out, args.overwrite)
    if is_main_process():  # under torchrun every rank converts its shard; one reports
        print(f"{args.direction}: {args.model} -> {out}")
