"""MXFP4 experts (GPT-OSS as published): dequantised one expert at a time while streaming.

A quantised stack `P` is stored as `P_blocks` [E, R, G, 16] uint8 (two FP4 e2m1 codes per byte, low nibble
first, 32 values per block) and `P_scales` [E, R, G] uint8 (one shared power-of-two exponent per block, biased by
127). Dequantised, row r of expert e is the G * 32 values code * 2^(scale - 127); transformers then transposes the
last two axes, so the tensor the model uses is [E, G * 32, R] (gate_up_proj: [E, H, 2I]; down_proj: [E, I, H]).
Every e2m1 value times a power of two is exact in bfloat16 and float32, so dequantising loses nothing.

transformers' own dequantiser (`integrations.mxfp4.convert_moe_packed_tensors`) works on whole stacks and is not a
public API; this one reads one expert's rows, checks shapes first (a wrong one is a one-line error, not an index
fault) and is tested against transformers' on the same tensors.
"""

from __future__ import annotations

import torch

from megatron_m2d.errors import M2DError

BLOCKS, SCALES = "_blocks", "_scales"
BLOCK_BYTES = 16  # 32 FP4 values per block, two per byte
# e2m1 codes 0..15: sign bit, two exponent bits, one mantissa bit (the OCP microscaling spec's FP4 table)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def quantised_name(key: str) -> str | None:
    """`...gate_up_proj_blocks` -> `...gate_up_proj` (the dequantised tensor's name); None for other keys."""
    return key[: -len(BLOCKS)] if key.endswith(BLOCKS) else None


def check_shapes(name: str, blocks_shape, scales_shape, blocks_dtype: str, scales_dtype: str) -> None:
    if blocks_dtype != "U8" or scales_dtype != "U8":
        raise M2DError(f"{name}: MXFP4 blocks and scales must be uint8 (found {blocks_dtype}, {scales_dtype})")
    if len(blocks_shape) != 4 or blocks_shape[-1] != BLOCK_BYTES or list(blocks_shape[:-1]) != list(scales_shape):
        raise M2DError(f"{name}: MXFP4 blocks {list(blocks_shape)} and scales {list(scales_shape)} do not fit "
                       f"([E, R, G, {BLOCK_BYTES}] and [E, R, G])")


def dequantised_shape(blocks_shape) -> list[int]:
    experts, rows, groups, _ = blocks_shape
    return [experts, groups * 2 * BLOCK_BYTES, rows]


def dequantise(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Blocks [..., R, G, 16] and scales [..., R, G] -> [..., G * 32, R] in `dtype` (one expert or a stack)."""
    table = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # low nibble first
    values = table[codes].flatten(-2)  # [..., R, G, 32]
    values = torch.ldexp(values, scales.to(torch.int32).sub(127).unsqueeze(-1))
    return values.flatten(-2).transpose(-1, -2).to(dtype).contiguous()
