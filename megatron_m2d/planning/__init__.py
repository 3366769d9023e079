"""`m2d plan`: per-GPU memory, FLOPs and time of a Megatron distillation run, before it is queued.

Pure arithmetic over the models' sizes (read from HF configs or `m2d convert` directories) and the run's layout;
it never imports megatron-core. shapes -> (flops, activations, memory) -> plan -> report.
"""

from megatron_m2d.planning.layout import ACCELERATORS, Accelerator, Layout
from megatron_m2d.planning.plan import Plan, make_plan
from megatron_m2d.planning.report import format_plan, plan_to_dict
from megatron_m2d.planning.shapes import ModelShape

__all__ = ["ACCELERATORS", "Accelerator", "Layout", "ModelShape", "Plan", "format_plan", "make_plan", "plan_to_dict"]
