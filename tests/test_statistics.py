"""Streaming calibration statistics equal a brute-force reference from the full HF model on the same tokens."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_m2d.calibration import gram
from megatron_m2d.calibration import run as calibrate_run
from megatron_m2d.calibration.run import calibrate
from megatron_m2d.data.text import token_blocks
from megatron_m2d.families import family_of
from tests.conftest import FAMILIES

TOKENS, SEQ = 640, 64


def brute_force(model_path, text_dir):
    """Per MoE layer: routing sums from what the HF model's own router returns in its own forward (selection and
    applied weights, captured by hooks), and Gram/REAP sums from its experts module run by its own forward with
    one-hot routing on the MoE inputs. Plain loops over tokens, no vectorised tricks."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = token_blocks(tokenizer, str(text_dir), TOKENS, SEQ, seed=0)
    family, config = family_of(model.config), model.config
    inputs, routes, hooks = {}, {}, []
    for i in family.moe_layers(config):
        mlp = model.model.layers[i].mlp
        hooks.append(mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0])))
        hooks.append(family.router_module(mlp).register_forward_hook(
            lambda m, a, out, i=i: routes.setdefault(i, []).append(out)))
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    k, E = family.top_k(config), family.num_experts(config)
    reference = {}
    for layer in family.moe_layers(config):
        z, g, chosen = (torch.cat([r[n] for r in routes[layer]]) for n in range(3))
        z, g = z.double(), g.double()
        # the paper's p_t: a softmax over all experts; DeepSeek-V3's router scores experts by a sigmoid
        p = torch.sigmoid(z) if config.model_type == "deepseek_v3" else torch.softmax(z, dim=-1)
        x = torch.cat(inputs[layer]).reshape(-1, config.hidden_size)
        experts = model.model.layers[layer].mlp.experts
        with torch.no_grad():  # E_e(x): the module's own forward, every token routed to e alone with weight 1
            outputs = torch.stack([experts(x, torch.full((x.shape[0], 1), e), torch.ones(x.shape[0], 1))
                                   for e in range(E)]).double()  # [E, T, H]
        count = torch.zeros(E, dtype=torch.int64)
        weight, reap, selected = (torch.zeros(E, dtype=torch.float64) for _ in range(3))
        gated = torch.zeros(E, E, dtype=torch.float64)
        for t in range(x.shape[0]):
            for slot in range(k):
                i = int(chosen[t, slot])
                count[i] += 1
                weight[i] += g[t, slot]
                selected[i] += p[t, i]
                reap[i] += g[t, slot] * outputs[i, t].norm()
                for slot2 in range(k):
                    j = int(chosen[t, slot2])
                    gated[i, j] += g[t, slot] * g[t, slot2] * outputs[i, t].dot(outputs[j, t])
        flat = outputs.reshape(E, -1)
        reference[layer] = {"tokens": x.shape[0], "count": count, "prob_sum": p.sum(0), "weight_sum": weight,
                            "prob_selected_sum": selected, "reap_sum": reap, "gram_gated": gated,
                            "gram": flat @ flat.T, "logit_outer": z.T @ z, "out_sum_all": outputs.sum(1)}
        if hasattr(model.model.layers[layer].mlp, "shared_expert_gate"):
            gate = model.model.layers[layer].mlp.shared_expert_gate
            with torch.no_grad():
                reference[layer]["shared_gate_sum"] = torch.sigmoid(gate(x).double()).sum()
    return reference


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_statistics_match_brute_force(family, tiny, text_dir, tmp_path, monkeypatch):
    model = tiny(family, layers=2)
    reference = brute_force(model, text_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("calibration must stream layers, not load the whole model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    stats = calibrate(model, str(text_dir), tmp_path / "stats", tokens=TOKENS, seq_len=SEQ, batch_size=3,
                      gram=True, dtype="float32", progress=False)
    assert stats.meta["tokens"] == TOKENS
    for layer, ref in reference.items():
        sums = stats.layer(layer).sums
        assert float(sums["tokens"]) == ref["tokens"]
        assert torch.equal(sums["count"], ref["count"])  # counts exact
        for name, value in ref.items():
            if name in ("tokens", "count"):
                continue
            # Sums over 640 tokens of fp32 quantities: per-token fp32 error ~1e-7 relative to the terms summed, so
            # 1e-5 absolute on sums of order 1 (routing) and 1e-5 relative to the tensor's largest entry (the
            # Gram: an entry's fp32 error scales with the products it sums, which a small entry may cancel;
            # GPT-OSS's biased experts reach ~1e4) is a tight bound.
            error = float((sums[name].double() - value).abs().max())
            assert error <= 1e-5 + 1e-5 * float(torch.as_tensor(value).double().abs().max()), (name, error)
        # derived quantities follow their definitions
        derived = stats.layer(layer)
        assert torch.allclose(derived.selection_freq, ref["count"].double() / TOKENS)
        assert float(derived.selection_freq.sum()) == pytest.approx(derived.top_k)


def test_calibration_resumes_after_a_kill(tiny, text_dir, tmp_path, monkeypatch):
    model = tiny("qwen2_moe", layers=3)
    fresh = calibrate(model, str(text_dir), tmp_path / "fresh", tokens=TOKENS, seq_len=SEQ, progress=False)

    original = calibrate_run.LayerStreamer.load_layer
    loaded = []

    def dies_at_layer_2(self, index):
        loaded.append(index)
        if index == 2 and len(loaded) < 4:
            raise KeyboardInterrupt("killed")
        return original(self, index)

    monkeypatch.setattr(calibrate_run.LayerStreamer, "load_layer", dies_at_layer_2)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, str(text_dir), out, tokens=TOKENS, seq_len=SEQ, progress=False)
    assert not out.exists() and (tmp_path / ".resumed.partial").is_dir()
    resumed = calibrate(model, str(text_dir), out, tokens=TOKENS, seq_len=SEQ, progress=False)
    assert loaded == [0, 1, 2, 2]  # the second run started at the layer the first one died in
    assert not (tmp_path / ".resumed.partial").exists()
    for layer in resumed.moe_layers:
        for name, value in fresh.layer(layer).sums.items():
            assert torch.equal(resumed.layer(layer).sums[name], value), name


def test_other_request_does_not_resume(tiny, text_dir, tmp_path, monkeypatch):
    """A partial run with other settings (here: another seed) is discarded, not continued."""
    model = tiny("qwen3_moe", layers=2)
    original = calibrate_run.LayerStreamer.load_layer
    calls = []

    def dies_at_layer_1(self, index):
        calls.append(index)
        if index == 1 and len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(calibrate_run.LayerStreamer, "load_layer", dies_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, str(text_dir), tmp_path / "s", tokens=TOKENS, seq_len=SEQ, seed=0, progress=False)
    calibrate(model, str(text_dir), tmp_path / "s", tokens=TOKENS, seq_len=SEQ, seed=1, progress=False)
    assert calls == [0, 1, 0, 1]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # [E, 2I, H] concatenated; [E, H, 2I] interleaved, biased
def test_all_expert_gram_in_chunks_equals_per_token_sums(family, tiny, monkeypatch):
    """Chunks of 5 over two batches, of 3 and 20 tokens (a short batch, then a buffer that must grow; a workspace
    kept between them), give the sums of the experts module's own forward, token by token, with one-hot routing."""
    model = AutoModelForCausalLM.from_pretrained(tiny(family, layers=1), dtype=torch.float32).eval()
    config = model.config
    experts = model.model.layers[0].mlp.experts
    E, H = family_of(config).num_experts(config), config.hidden_size
    x = torch.randn(23, H)
    monkeypatch.setattr(gram, "chunk_tokens", lambda *args: 5)
    sums = {"gram": torch.zeros(E, E, dtype=torch.float64), "out_sum_all": torch.zeros(E, H, dtype=torch.float64)}
    workspace = {}
    for batch in (x[:3], x[3:]):
        gram.add_all_expert_gram(sums, experts, batch, workspace)
    gram_reference, out_reference = torch.zeros(E, E, dtype=torch.float64), torch.zeros(E, H, dtype=torch.float64)
    with torch.no_grad():
        for token in x:
            outputs = torch.cat([experts(token[None], torch.full((1, 1), e), torch.ones(1, 1))
                                 for e in range(E)]).double()  # [E, H]
            gram_reference += outputs @ outputs.T
            out_reference += outputs
    for name, reference in (("gram", gram_reference), ("out_sum_all", out_reference)):
        # fp32 products summed over 23 tokens: 1e-5 of the largest entry is far above their rounding
        error = float((sums[name] - reference).abs().max())
        assert error <= 1e-5 * float(reference.abs().max()), (name, error)
