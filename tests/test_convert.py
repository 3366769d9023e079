"""Megatron-Core conversion: dense students and MoE teachers, tensors round-trip bitwise, logits equal at TP1."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_m2d.convert.dense_mapping import DENSE_TYPES, hf_to_megatron, megatron_to_hf
from megatron_m2d.demo import FIXTURE_MOE
from megatron_m2d.densification.run import densify
from megatron_m2d.errors import M2DError
from tests.megatron_cpu import causal_mask, megatron_cpu  # noqa: F401  (fixture)


def tiny_dense(model_type, **extra):
    fields = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
    if model_type == "mistral":
        fields["sliding_window"] = None
    config = AutoConfig.for_model(model_type, **{**fields, **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", list(DENSE_TYPES))
def test_round_trip_is_bitwise(model_type):
    model = tiny_dense(model_type)
    hf = {k: v for k, v in model.state_dict().items()}
    back = megatron_to_hf(hf_to_megatron(hf, model.config), model.config)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_sliding_window_is_refused():
    model = tiny_dense("mistral", sliding_window=16)
    with pytest.raises(M2DError, match="sliding-window"):
        hf_to_megatron(model.state_dict(), model.config)


def megatron_logits(model, ids):
    from megatron_m2d.convert.megatron_model import build_gpt_model

    mega = build_gpt_model(model.config)
    missing, unexpected = mega.load_state_dict(hf_to_megatron(model.state_dict(), model.config), strict=False)
    assert [k for k in missing if not k.endswith("_extra_state")] == [] and unexpected == []
    mega.eval()
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return mega(ids, positions, attention_mask=causal_mask(ids.shape[1]))


@pytest.mark.parametrize("model_type", list(DENSE_TYPES))
def test_megatron_logits_equal_hf(megatron_cpu, model_type):  # noqa: F811
    """fp32 on CPU: the two implementations order a few sums differently; 1e-4 on logits of order 1."""
    model = tiny_dense(model_type)
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.allclose(megatron_logits(model, ids), expected, atol=1e-4, rtol=0)


def test_densified_fixture_student_runs_in_megatron(megatron_cpu, tmp_path):  # noqa: F811
    """The student exactly as densify wrote it (tied embeddings, bf16 on disk, upcast to fp32) gives the same
    logits. A trained model's logits reach ~20, so fp32 re-association noise is ~1e-5: 1e-3 still catches any
    wrong tensor (those move logits by > 0.1)."""
    student = densify(FIXTURE_MOE, tmp_path / "dense", "gld_reap", data="fixture", progress=False,
                      calibration=dict(tokens=1024, seq_len=128)).path
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.allclose(megatron_logits(model, ids), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2"])
def test_distributed_checkpoint_round_trip_is_bitwise(megatron_cpu, model_type, tmp_path):
    from safetensors.torch import load_file

    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint

    model = tiny_dense(model_type)
    model.save_pretrained(tmp_path / "hf")
    mega = hf_to_megatron_checkpoint(tmp_path / "hf", tmp_path / "megatron")
    assert (mega / "m2d_convert.json").is_file() and (mega / "metadata.json").is_file()
    back = megatron_to_hf_checkpoint(mega, tmp_path / "back")
    original = {k: v for k, v in model.state_dict().items()}
    restored = {}
    for shard in back.glob("*.safetensors"):
        restored.update(load_file(shard))
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)
    reloaded = AutoModelForCausalLM.from_pretrained(back)
    ids = torch.randint(0, 259, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_convert_refuses_parallel_sizes_it_cannot_write_yet(megatron_cpu, tmp_path):
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint

    tiny_dense("qwen3").save_pretrained(tmp_path / "hf")
    with pytest.raises(M2DError, match="--tp 1 --pp 1"):
        hf_to_megatron_checkpoint(tmp_path / "hf", tmp_path / "out", tp=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,extra", [("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": False}),
                                          ("mixtral", {})])
def test_moe_teacher_logits_equal_hf(megatron_cpu, tiny, family, extra):  # noqa: F811
    """The MoE teacher at TP1/EP1 (allgather dispatcher, sequential experts): same routing, same logits."""
    from megatron_m2d.convert import moe_mapping
    from megatron_m2d.convert.megatron_model import build_gpt_model

    model = AutoModelForCausalLM.from_pretrained(tiny(family, **extra)).eval()
    mega = build_gpt_model(model.config)
    missing, unexpected = mega.load_state_dict(moe_mapping.hf_to_megatron(model.state_dict(), model.config),
                                               strict=False)
    assert [k for k in missing if not k.endswith("_extra_state")] == [] and unexpected == []
    mega.eval()
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = mega(ids, torch.arange(16).unsqueeze(0).expand_as(ids), attention_mask=causal_mask(16))
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,message", [("qwen2_moe", "sigmoid gate"), ("olmoe", "whole projection")])
def test_moe_families_megatron_cannot_express_are_refused(tiny, family, message):
    from megatron_m2d.convert import moe_mapping

    model = AutoModelForCausalLM.from_pretrained(tiny(family))
    with pytest.raises(M2DError, match=message):
        moe_mapping.hf_to_megatron(model.state_dict(), model.config)


def test_checkpoint_written_at_tp1_loads_at_tp2(megatron_cpu, tmp_path):  # noqa: F811
    """Resharding on load: 2 gloo processes load the TP1 checkpoint at tensor parallel size 2 and produce the HF
    model's logits (fp32; the TP all-reduces sum partial products in another order: 1e-4)."""
    import torch.multiprocessing as mp

    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint
    from tests.megatron_cpu import free_port, tp_logits_worker

    model = tiny_dense("qwen3", vocab_size=256)  # TP shards the vocabulary: it must divide (no padding yet)
    model.save_pretrained(tmp_path / "hf")
    checkpoint = hf_to_megatron_checkpoint(tmp_path / "hf", tmp_path / "megatron")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    torch.save(ids, tmp_path / "ids.pt")
    mp.spawn(tp_logits_worker, args=(2, free_port(), str(checkpoint), str(tmp_path / "ids.pt"),
                                     str(tmp_path / "logits.pt")), nprocs=2, join=True)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    got = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_teacher_checkpoint_round_trip_is_bitwise(megatron_cpu, tiny, family, tmp_path):  # noqa: F811
    """The teacher as saved on disk (per-expert keys) -> Megatron dist checkpoint -> the same HF tensors."""
    from safetensors.torch import load_file

    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint

    teacher = tiny(family)
    back = megatron_to_hf_checkpoint(hf_to_megatron_checkpoint(teacher, tmp_path / "megatron"), tmp_path / "back")
    original = load_file(teacher / "model.safetensors")
    restored = {}
    for shard in back.glob("*.safetensors"):
        restored.update(load_file(shard))
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_convert_cli_on_a_machine_without_cuda(tiny, tmp_path, capsys):
    """Without CUDA (and without the test patches) the writer cannot run: one line, exit 2, nothing written."""
    pytest.importorskip("megatron.core")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from megatron_m2d.cli import main

    teacher = tiny("qwen3_moe")
    capsys.readouterr()
    assert main(["convert", "hf-to-megatron", "--model", str(teacher), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA device" in err[0]
    assert not (tmp_path / "m").exists()


def test_moe_checkpoint_written_at_ep1_loads_at_ep2(megatron_cpu, tiny, tmp_path):  # noqa: F811
    """Expert parallel resharding on load: 2 gloo processes, 4 experts each, the teacher's logits."""
    import torch.multiprocessing as mp

    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint
    from tests.megatron_cpu import free_port, tp_logits_worker

    teacher = tiny("qwen3_moe")
    checkpoint = hf_to_megatron_checkpoint(teacher, tmp_path / "megatron")
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(5))
    torch.save(ids, tmp_path / "ids.pt")
    mp.spawn(tp_logits_worker, args=(2, free_port(), str(checkpoint), str(tmp_path / "ids.pt"),
                                     str(tmp_path / "logits.pt"), True), nprocs=2, join=True)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.allclose(torch.load(tmp_path / "logits.pt", weights_only=True), expected, atol=1e-4, rtol=0)
