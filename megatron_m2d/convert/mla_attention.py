"""Core attention for multi-latent attention in megatron-core's local (non Transformer Engine) spec.

Written by hand because megatron-core lacks it: its local DotProductAttention assumes one head size for q, k and v
(`kv_channels`), while MLA's query/key heads (no-rope + rope part) are wider than its value heads, so MLA is
otherwise TE-only (megatron-core 0.16-0.19). With this, DeepSeek teachers run on CPU and on GPUs without TE.
Unfused (torch's scaled_dot_product_attention); causal self-attention only, as DeepSeek uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MLACoreAttention(torch.nn.Module):
    """Drop-in for the `core_attention` submodule of MLASelfAttention: [s, b, h, d] in, [s, b, h * dv] out."""

    def __init__(self, config, layer_number=None, attn_mask_type=None, attention_type=None, softmax_scale=None,
                 k_channels=None, v_channels=None, **_):
        super().__init__()
        self.config = config
        self.softmax_scale = softmax_scale  # None: 1/sqrt(query head size), as SDPA does by default

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("MLACoreAttention: packed sequences and attention bias need the TE spec")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        # Megatron's masks are True where attention is NOT allowed; SDPA's boolean masks are the opposite.
        mask = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale,
            dropout_p=self.config.attention_dropout if self.training else 0.0)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)
