"""Target parallel sizes of a Megatron checkpoint, checked against the model before anything is written.

Pure arithmetic (no Megatron import but in `from_parallel_state`), so a bad `--tp/--pp/--ep/--vpp` fails in a second with a one-line reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ParallelSizes:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    vpp: int | None = None  # virtual pipeline stages per pipeline rank (interleaved schedule)

    @classmethod
    def from_parallel_state(cls) -> "ParallelSizes":
        """The sizes megatron-core's parallel state is initialised with (the one method that imports it)."""
        from megatron.core import parallel_state as ps

        return cls(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                   ep=ps.get_expert_model_parallel_world_size(),
                   vpp=ps.get_virtual_pipeline_model_parallel_world_size())

    @property
    def model_parallel_world(self) -> int:
        """Ranks holding distinct parameter shards (data parallel ranks hold copies)."""
        return self.tp * self.pp * self.ep

    def problems(self, megatron_kwargs: dict, vocab_rows: int) -> list[str]:
        """Why these sizes cannot hold the model described by TransformerConfig kwargs; empty when they can."""
        out = []
        for name, value in asdict(self).items():
            if value is not None and value < 1:
                out.append(f"--{name} must be >= 1, got {value}")
        if out:
            return out
        k = megatron_kwargs
        if k["num_attention_heads"] % self.tp:
            out.append(f"--tp {self.tp} does not divide the {k['num_attention_heads']} attention heads")
        if k["num_query_groups"] % self.tp:
            out.append(f"--tp {self.tp} does not divide the {k['num_query_groups']} key/value heads")
        if k["ffn_hidden_size"] % self.tp:
            out.append(f"--tp {self.tp} does not divide the FFN width {k['ffn_hidden_size']}")
        if vocab_rows % self.tp:
            out.append(f"--tp {self.tp} does not divide the padded vocabulary {vocab_rows} "
                       "(raise --make-vocab-size-divisible-by)")
        experts = k.get("num_moe_experts")
        if experts:
            if experts % self.ep:
                out.append(f"--ep {self.ep} does not divide the {experts} experts")
            if k["moe_ffn_hidden_size"] % self.tp:  # expert TP defaults to TP
                out.append(f"--tp {self.tp} does not divide the expert width {k['moe_ffn_hidden_size']}")
        elif self.ep != 1:
            out.append(f"--ep {self.ep} given for a dense model (expert parallelism needs experts)")
        stages = self.pp * (self.vpp or 1)
        if k["num_layers"] % stages:
            out.append(f"--pp {self.pp}" + (f" x --vpp {self.vpp}" if self.vpp else "")
                       + f" does not divide the {k['num_layers']} layers into equal stages")
        if self.vpp and self.pp == 1:
            out.append("--vpp needs --pp > 1 (virtual stages interleave pipeline ranks)")
        return out

    def transformer_config_kwargs(self, moe: bool) -> dict:
        return dict(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                    expert_model_parallel_size=self.ep, virtual_pipeline_model_parallel_size=self.vpp,
                    # megatron-core requires sequence parallelism for MoE layers under TP > 1
                    sequence_parallel=moe and self.tp > 1)
