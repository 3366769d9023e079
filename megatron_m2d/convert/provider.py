"""The model-provider config that travels with a converted checkpoint (`m2d_convert.json`), and what builds and
loads the matching Megatron model from it: what a Megatron training script (our distillation) calls.

    provider = model_provider("ckpt/teacher")                 # after parallel_state.initialize_model_parallel
    model = provider(vp_stage=None)                           # this rank's stage, any TP/PP/EP
    load_checkpoint(model, "ckpt/teacher")                    # resharded by megatron-core on load
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from megatron_m2d.convert.parallel import ParallelSizes
from megatron_m2d.errors import M2DError, one_line

META = "m2d_convert.json"
FORMAT = "m2d-megatron/2"


@dataclass(frozen=True)
class ProviderConfig:
    hf_config: PretrainedConfig
    parallel: ParallelSizes  # the sizes it was converted for (any other loads too)
    vocab_rows: int  # padded vocabulary of the Megatron embedding / output layer
    dtype: torch.dtype
    hf_dtypes: dict[str, str] = field(default_factory=dict)  # HF tensors stored in another dtype (V3's fp32 bias)

    def hf_dtype(self, name: str) -> torch.dtype:
        """What an exported HF tensor is cast back to (Megatron may hold some parameters in fp32)."""
        return getattr(torch, self.hf_dtypes[name]) if name in self.hf_dtypes else self.dtype

    def to_json(self, **extra) -> dict:
        return {"format": FORMAT, "hf_config": self.hf_config.to_dict(), "parallel": vars(self.parallel),
                "vocab_rows": self.vocab_rows, "dtype": str(self.dtype).removeprefix("torch."),
                "hf_dtypes": self.hf_dtypes, **extra}


def read_provider_config(checkpoint: str | Path) -> ProviderConfig:
    path = Path(checkpoint) / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise M2DError(f"{checkpoint} is not a checkpoint written by `m2d convert hf-to-megatron` "
                       f"(no {META})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise M2DError(f"{path}: format {found!r}, this version reads {FORMAT!r}; convert again")
    try:
        values = dict(meta["hf_config"])
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        dtypes = {name: getattr(torch, value) for name, value in
                  {"": meta["dtype"], **dict(meta.get("hf_dtypes", {}))}.items()}
        if not all(isinstance(t, torch.dtype) for t in dtypes.values()):
            raise ValueError("a dtype is not a torch dtype name")
        return ProviderConfig(config, ParallelSizes(**meta["parallel"]), int(meta["vocab_rows"]), dtypes[""],
                              {k: v for k, v in dict(meta.get("hf_dtypes", {})).items()})
    except Exception as exc:  # noqa: BLE001 -- a hand-edited or damaged file: say so in one line
        raise M2DError(f"{path} is corrupt ({one_line(exc)}); convert the model again") from None


def model_provider(checkpoint: str | Path, params_dtype: torch.dtype | None = None, parallel_output: bool = True,
                   use_te: bool | None = None, moe_grouped_gemm: bool | None = None,
                   sizes: ParallelSizes | None = None, config_overrides: dict | None = None):
    """A Megatron-style provider: (vp_stage=None) -> this rank's GPTModel, sized by the current parallel state
    (or by `sizes`: a dense student beside an expert-parallel teacher has EP 1). `config_overrides` are
    TransformerConfig fields set over the checkpoint's (training settings: bf16, fp8, recompute, router top-k)."""
    from megatron_m2d.convert.megatron_model import build_gpt_model

    provider = read_provider_config(checkpoint)

    def build(vp_stage: int | None = None):
        return build_gpt_model(provider.hf_config, params_dtype or provider.dtype,
                               sizes or ParallelSizes.from_parallel_state(), provider.vocab_rows,
                               vp_stage=vp_stage, parallel_output=parallel_output, use_te=use_te,
                               moe_grouped_gemm=moe_grouped_gemm, config_overrides=config_overrides)

    return build


def load_checkpoint(model, checkpoint: str | Path) -> None:
    """Load a converted checkpoint into a Megatron model of any parallel layout and either layer spec. Extra
    states (Transformer Engine's FP8 metadata) that the checkpoint does not hold start fresh; every weight must
    be there. Read through `dcp_read` (never megatron-core's reader, which unpickles the files freely)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_m2d.convert.dcp_read import ChunkReader, load_sharded

    reader = ChunkReader(checkpoint)
    stored = set(reader.keys())
    sharded = {k: v for k, v in model.sharded_state_dict().items()
               if not (isinstance(v, ShardedObject) and v.unique_key not in stored)}
    state = load_sharded(reader, sharded)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise M2DError(f"checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
