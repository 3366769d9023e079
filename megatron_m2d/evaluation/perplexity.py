"""Held-out perplexity of a HF causal LM (MoE or dense alike), token-weighted.

The source's `eval` documents are tokenized in order and joined with the end-of-text token into one stream of
up to `max_tokens` tokens. Two methods:
- `nonoverlapping` (default): windows of `seq_len` tokens; every token but the first of each window is scored
  once, with the context before it inside its window.
- `sliding`: windows of `seq_len` advanced by `stride`; each token is scored once, in the window that gives it
  the most context (at least seq_len - stride tokens once the first window is past), as in HF's perplexity guide.
Perplexity = exp(sum of token NLLs / number of scored tokens).
"""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from megatron_m2d.data.text import token_stream
from megatron_m2d.errors import M2DError
from megatron_m2d.io.checkpoint import load_tokenizer
from megatron_m2d.io.model_card import Evaluation, public_name
from megatron_m2d.io.model_checks import check_hf_model

METHODS = ("nonoverlapping", "sliding")
# what a reader of a model card should read for the named sources' eval splits
EVAL_SPLIT_NAMES = {"fixture": "Julius Caesar (held out from the fixture's training)",
                    "wikitext2": "WikiText-2 (raw, test split)", "wikitext103": "WikiText-103 (raw, test split)",
                    "fineweb-edu": "FineWeb-Edu sample-10BT (m2d's 5 % eval share)"}


def _window_nll(model, ids: torch.Tensor, scored_from: int) -> tuple[float, int]:
    """Summed NLL of the tokens ids[:, scored_from + 1:] given everything before them."""
    logits = model(input_ids=ids).logits.float()
    targets = ids[:, scored_from + 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, scored_from:-1].reshape(-1, logits.shape[-1]),
                                            targets.reshape(-1), reduction="sum")
    return float(nll), targets.numel()


def perplexity(model, tokenizer, source: str, seq_len: int = 256, max_tokens: int = 32768, batch_size: int = 8,
               method: str = "nonoverlapping", stride: int | None = None) -> dict:
    """{'ppl', 'nll', 'tokens', 'method'} of `model` on up to `max_tokens` tokens of `source`'s eval split."""
    stream = token_stream(tokenizer, source, max_tokens, role="eval")
    return stream_perplexity(model, stream, seq_len, batch_size, method, stride)


@torch.no_grad()
def stream_perplexity(model, stream: torch.Tensor, seq_len: int = 256, batch_size: int = 8,
                      method: str = "nonoverlapping", stride: int | None = None) -> dict:
    """Perplexity of `model` on a token stream (see the module docstring for the two methods)."""
    if method not in METHODS:
        raise M2DError(f"unknown perplexity method {method!r} (choose from {', '.join(METHODS)})")
    if len(stream) < seq_len:
        raise M2DError(f"eval data has {len(stream)} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    if method == "nonoverlapping":
        blocks = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
        for batch in blocks.split(batch_size):
            nll, count = _window_nll(model, batch.to(device), 0)
            total_nll, total_tokens = total_nll + nll, total_tokens + count
    else:
        stride = seq_len // 2 if stride is None else stride
        if not 0 < stride <= seq_len:
            raise M2DError("--stride must lie in [1, seq_len]")
        scored_until = 0  # tokens [1, scored_until] already scored
        for begin in range(0, len(stream) - 1, stride):
            end = min(begin + seq_len, len(stream))
            window = stream[begin:end].unsqueeze(0).to(device)
            first_new = max(scored_until - begin, 0)  # window position of the last already-scored token
            nll, count = _window_nll(model, window, first_new)
            total_nll, total_tokens = total_nll + nll, total_tokens + count
            scored_until = end - 1
            if end == len(stream):
                break
    mean = total_nll / total_tokens
    if not math.isfinite(mean):  # a score is never NaN: name the cause instead
        raise M2DError(f"the model's logits are NaN or infinite on the eval data (mean NLL {mean})")
    return {"ppl": math.exp(mean) if mean < 700 else math.inf, "nll": mean, "tokens": total_tokens,
            "method": method}


def load_model(model_dir, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A HF model from a local safetensors checkpoint (never a pickle) whose every weight was in the checkpoint
    (transformers would re-initialise a missing one with a warning) and finite."""
    check_hf_model(model_dir)  # the checks and messages every command applies to a model directory
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report would repeat, over many lines, what we say in one
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                           output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise M2DError(f"cannot load {model_dir}: {str(exc).strip().splitlines()[0]}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if missing:
        raise M2DError(f"{model_dir}: weights missing or misshapen in the checkpoint: {', '.join(missing[:3])}")
    model = model.to(device).eval()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise M2DError(f"{model_dir}: weight {name} holds NaN or infinite values")
    return model, load_tokenizer(model_dir)


def perplexity_of_dir(model_dir, source: str, device: str = "cpu", **kwargs) -> dict:
    model, tokenizer = load_model(model_dir, device)
    return perplexity(model, tokenizer, source, **kwargs)


def as_evaluation(result: dict, source: str, seq_len: int) -> Evaluation:
    """A perplexity result as a model-card evaluation (model-index entry and table row)."""
    how = f"{result['tokens']:,} tokens scored, {result['method']} windows of {seq_len}"
    if result.get("stride"):
        how += f", stride {result['stride']}"
    return Evaluation(metric="perplexity", value=result["ppl"], dataset=public_name(source),
                      dataset_name=EVAL_SPLIT_NAMES.get(source, f"{public_name(source)} (eval split)"), details=how)
