"""Held-out perplexity of a HF causal LM (MoE or dense alike).

Method: the text is tokenized and packed into non-overlapping windows of `seq_len` tokens (documents joined by
the end-of-text token, as in calibration); every token but the first of each window is predicted once, and
perplexity is exp(sum of token NLLs / number of predicted tokens), i.e. token-weighted.
"""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_m2d.data.text import token_blocks


@torch.no_grad()
def perplexity(model, tokenizer, source: str, seq_len: int = 256, max_tokens: int = 32768,
               batch_size: int = 8, seed: int = 0) -> dict:
    """{'ppl', 'nll', 'tokens'} of `model` on up to `max_tokens` tokens of `source`."""
    blocks = token_blocks(tokenizer, source, max_tokens, seq_len, seed)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in blocks.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens}


def perplexity_of_dir(model_dir, source: str, **kwargs) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return perplexity(model, tokenizer, source, **kwargs)
