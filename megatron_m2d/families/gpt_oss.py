"""GPT-OSS: a router with bias (top-k on the logits, softmax over the k selected: always renormalised), experts fused
on disk as [E, H, 2I] with gate/up columns interleaved and biased, clamped SwiGLU computed by the experts module's
own `_apply_gate`, and a down bias. Attention sinks and sliding-window layers are copied as they are; the sinks
need the eager attention: transformers' sdpa path silently drops them and its flex path refuses them on CPU
(eager holds a [batch, heads, seq, seq] score tensor per layer: lower --batch-size for long sequences). Hub
checkpoints store the experts in MXFP4 (`*_blocks`, `*_scales`): the checkpoint reader dequantises them one
expert at a time (io/mxfp4.py).

transformers has no dense class with GPT-OSS's attention, so the student is a GPT-OSS with one expert of width k*I
and top-1 routing (families.md): gate/up biases concatenate with their rows, the down bias is sum_g s_g b_g.
"""

from megatron_m2d.families.base import Family
from megatron_m2d.families.parts import ExpertKeys

GPT_OSS = Family(
    model_type="gpt_oss",
    moe_block="mlp",
    dense_model_type=None,
    experts=ExpertKeys(fused_input_major=True, fused_interleaved=True, fused_on_disk=True),
    router="router.weight",
    num_experts_field="num_local_experts",
    width_field="intermediate_size",
    renormalizes_of=lambda config: True,
    attention="eager",
)
