"""The converted checkpoints on a GPU: Transformer Engine's layer spec (fused norms, grouped-GEMM experts, TE's
MLA) and the local spec load the same checkpoint and give HF's logits; a checkpoint megatron-core itself saves
from the TE model exports back to the HF tensors. Skipped without CUDA (CI); TE-only cases skip without TE."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_m2d.convert.megatron_model import te_available
from tests.megatron_cpu import free_port
from tests.convert_models import safetensors_dir, teacher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def megatron_gpu(monkeypatch):
    pytest.importorskip("megatron.core")
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    # fp32 reference: no TF32 in either implementation
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def logits_on_gpu(checkpoint, ids, use_te):
    from megatron_m2d.convert.provider import load_checkpoint, model_provider

    model = model_provider(checkpoint, params_dtype=torch.float32, parallel_output=False, use_te=use_te)().cuda()
    load_checkpoint(model, checkpoint)
    model.eval()
    ids = ids.cuda()
    with torch.no_grad():  # no mask: both specs use their causal mask type
        return model(ids, torch.arange(ids.shape[1], device="cuda").unsqueeze(0).expand_as(ids),
                     attention_mask=None).float().cpu(), model


def hf_logits_on_gpu(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        return model(input_ids=ids.cuda()).logits.float().cpu()


SPECS = [pytest.param(False, id="local"),
         pytest.param(True, id="te", marks=pytest.mark.skipif(not te_available(), reason="Transformer Engine"))]


@pytest.mark.parametrize("use_te", SPECS)
@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_gpu_logits_equal_hf(megatron_gpu, tiny, family, use_te, tmp_path):
    """fp32, TF32 off in torch: 1e-4 for the local spec, as on CPU. TE's fp32 GEMMs run in TF32 on Hopper
    (10-bit mantissa; measured up to 4.3e-4 on these logits of order 1): 2e-3 for TE. A wrong tensor moves
    logits by > 0.1."""
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint

    hf = teacher(tiny, family, tmp_path / "hf")
    checkpoint = hf_to_megatron_checkpoint(hf, tmp_path / "megatron")
    ids = torch.randint(0, 259, (2, 32), generator=torch.Generator().manual_seed(0))
    got, model = logits_on_gpu(checkpoint, ids, use_te)
    expected = hf_logits_on_gpu(hf, ids)
    if use_te and family.endswith("moe"):
        from megatron.core.transformer.moe.experts import TEGroupedMLP

        assert any(isinstance(m, TEGroupedMLP) for m in model.modules()), "TE spec should use grouped GEMM"
    err = (got[..., :259] - expected).abs().max().item()
    print(f"{family} {'te' if use_te else 'local'}: max |logit diff| {err:.2e}")
    assert err < (2e-3 if use_te else 1e-4)


@pytest.mark.skipif(not te_available(), reason="Transformer Engine")
@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "deepseek_v3"])
def test_checkpoint_megatron_saves_from_te_model_exports_bitwise(megatron_gpu, tiny, family, tmp_path):
    """Our checkpoint -> TE model (grouped experts, fused norms) -> megatron-core's own save -> our export ->
    the original HF tensors."""
    from megatron.core import dist_checkpointing

    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint

    hf = teacher(tiny, family, tmp_path / "hf")
    ours = hf_to_megatron_checkpoint(hf, tmp_path / "ours")
    _, model = logits_on_gpu(ours, torch.zeros(1, 4, dtype=torch.long), use_te=True)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(theirs))
    for name in ("m2d_convert.json", "hf_side_files"):
        os.symlink(ours / name, theirs / name)
    back = safetensors_dir(megatron_to_hf_checkpoint(theirs, tmp_path / "back"))
    original = safetensors_dir(hf)
    assert back.keys() == original.keys()
    bad = [k for k in original if not torch.equal(back[k], original[k].to(back[k].dtype))]
    assert not bad, bad[:5]
