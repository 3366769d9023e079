"""The sizes of a model that memory and FLOPs depend on, read from a HF config or a `m2d convert` directory.

The numbers come from the same TransformerConfig fields the converter gives megatron-core
(`convert.megatron_model.transformer_config_kwargs`, pure: it imports no Megatron), so the planner sees the model
the engine builds: padded vocabulary, fused QKV, q/k norms, MLA projections, GPT-OSS biases and sinks, per-layer
windows, dense layers between MoE layers, shared experts. Parameter counts are exact (tests compare them with
the parameters of the HF and Megatron models).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_m2d.errors import M2DError


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    query_groups: int
    qk_head_dim: int  # query/key width per head (MLA: no-rope + rope parts)
    v_head_dim: int
    ffn: int  # width of the dense FFN (the student's, or a teacher's dense layers)
    vocab_rows: int  # the padded vocabulary of the Megatron embedding and output layer
    tied: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    linear_bias: bool = False  # every linear has a bias (GPT-OSS)
    sinks: bool = False  # a learned softmax offset per head (GPT-OSS)
    moe_layers: tuple[int, ...] = ()
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0
    shared_gate: bool = False
    expert_bias: bool = False  # DeepSeek-V3's routing correction bias
    q_lora_rank: int | None = None  # MLA only (None: no q compression)
    kv_lora_rank: int | None = None  # MLA only
    rope_head_dim: int = 0  # MLA only: the rotary part of qk_head_dim
    windows: tuple[int | None, ...] = ()  # per layer: attention window in tokens, None for full attention

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config, vocab_rows: int | None = None, name: str | None = None) -> "ModelShape":
        from megatron_m2d.convert.dense_mapping import padded_vocab
        from megatron_m2d.convert.megatron_model import transformer_config_kwargs

        k = transformer_config_kwargs(config)
        layers = k["num_layers"]
        mla = bool(k.get("multi_latent_attention"))
        freq = k.get("moe_layer_freq", 1)
        moe_layers = (tuple(i for i, is_moe in enumerate(freq) if is_moe) if isinstance(freq, list)
                      else tuple(range(layers)) if "num_moe_experts" in k else ())
        window, sliding = k.get("window_size"), k.get("window_attn_skip_freq")
        windows = tuple((window[0] + 1 if window and (sliding is None or sliding[i]) else None)
                        for i in range(layers))
        return cls(
            name=name or config.model_type, layers=layers, hidden=k["hidden_size"], heads=k["num_attention_heads"],
            query_groups=k["num_query_groups"],
            qk_head_dim=(k["qk_head_dim"] + k["qk_pos_emb_head_dim"]) if mla else k["kv_channels"],
            v_head_dim=k["v_head_dim"] if mla else k["kv_channels"], ffn=k["ffn_hidden_size"],
            vocab_rows=vocab_rows or padded_vocab(config), tied=bool(getattr(config, "tie_word_embeddings", False)),
            qk_norm=bool(k.get("qk_layernorm")), qkv_bias=bool(k.get("add_qkv_bias")),
            linear_bias=bool(k.get("add_bias_linear")), sinks=k.get("softmax_type") == "learnable",
            moe_layers=moe_layers, experts=k.get("num_moe_experts") or 0, top_k=k.get("moe_router_topk") or 0,
            expert_ffn=k.get("moe_ffn_hidden_size") or 0,
            shared_ffn=k.get("moe_shared_expert_intermediate_size") or 0,
            shared_gate=bool(k.get("moe_shared_expert_gate")),
            expert_bias=bool(k.get("moe_router_enable_expert_bias")),
            q_lora_rank=k.get("q_lora_rank") if mla else None, kv_lora_rank=k.get("kv_lora_rank") if mla else None,
            rope_head_dim=k["qk_pos_emb_head_dim"] if mla else 0, windows=windows)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelShape":
        """A `m2d convert` directory (its m2d_convert.json: HF config + padded vocabulary) or a HF model
        directory (only config.json is read: a plan needs no weights)."""
        config, vocab_rows = config_of_dir(path)
        return cls.from_hf_config(config, vocab_rows, name=Path(path).name)

    # ---- parameters --------------------------------------------------------------------------------------
    @property
    def mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def attention_matmul_params(self) -> int:
        """One layer's attention projections (the weights a token multiplies with)."""
        h, a = self.hidden, self.heads
        q_width, v_width = a * self.qk_head_dim, a * self.v_head_dim
        if self.mla:
            q = h * q_width if self.q_lora_rank is None else (h + q_width) * self.q_lora_rank
            nope = self.qk_head_dim - self.rope_head_dim
            kv = h * (self.kv_lora_rank + self.rope_head_dim) + self.kv_lora_rank * a * (nope + self.v_head_dim)
            return q + kv + v_width * h
        return h * (q_width + 2 * self.query_groups * self.qk_head_dim) + v_width * h

    def attention_params(self) -> int:
        """One layer's attention, its input norm included."""
        params = self.hidden + self.attention_matmul_params()
        if self.mla:  # the q (when compressed) and kv latent norms
            return params + (self.q_lora_rank or 0) + self.kv_lora_rank
        params += (self.heads + 2 * self.query_groups) * self.qk_head_dim if self.qkv_bias else 0
        params += self.hidden if self.linear_bias else 0
        params += 2 * self.qk_head_dim if self.qk_norm else 0
        return params + (self.heads if self.sinks else 0)

    def ffn_params(self, width: int) -> int:
        """A SwiGLU FFN of this width (fc1 holds gate and up)."""
        return 3 * self.hidden * width + (2 * width + self.hidden if self.linear_bias else 0)

    def expert_params(self) -> int:
        """One routed expert."""
        return self.ffn_params(self.expert_ffn)

    def moe_shared_params(self) -> int:
        """A MoE layer's parameters outside its routed experts: router, shared expert and its gate."""
        router = self.hidden * self.experts + (self.experts if self.linear_bias else 0)
        router += self.experts if self.expert_bias else 0
        shared = self.ffn_params(self.shared_ffn) if self.shared_ffn else 0
        return router + shared + (self.hidden if self.shared_gate else 0)

    def layer_params(self, layer: int) -> tuple[int, int]:
        """(dense parameters, routed-expert parameters) of one decoder layer, its pre-MLP norm included."""
        dense = self.attention_params() + self.hidden
        if layer in self.moe_layers:
            return dense + self.moe_shared_params(), self.experts * self.expert_params()
        return dense + self.ffn_params(self.ffn), 0

    @property
    def token_ffn_width(self) -> int:
        """The FFN width a token passes through: the dense FFN, or top-k routed experts plus shared ones (a
        one-expert student: its single expert)."""
        return self.top_k * self.expert_ffn + self.shared_ffn if self.is_moe else self.ffn

    @property
    def embedding_params(self) -> int:
        return self.vocab_rows * self.hidden

    @property
    def output_params(self) -> int:
        """The output layer (none of its own when tied to the embedding), with the final norm."""
        return self.hidden + (0 if self.tied else self.vocab_rows * self.hidden)

    def total_params(self) -> int:
        return self.embedding_params + self.output_params + sum(sum(self.layer_params(i)) for i in range(self.layers))

    def active_params(self) -> int:
        """Parameters a token passes through (top_k of the routed experts), embeddings included."""
        routed = len(self.moe_layers) * self.top_k * self.expert_params()
        dense = sum(self.layer_params(i)[0] for i in range(self.layers))
        return self.embedding_params + self.output_params + dense + routed

    def describe(self) -> str:
        kind = (f"MoE {self.experts} experts top-{self.top_k} width {self.expert_ffn} on {len(self.moe_layers)} "
                f"layers" if self.is_moe else f"dense FFN {self.ffn}")
        return (f"{self.name}: {self.total_params() / 1e9:.2f} B parameters ({self.active_params() / 1e9:.2f} B "
                f"active), {self.layers} layers, hidden {self.hidden}, {kind}, vocabulary {self.vocab_rows}")


def config_of_dir(path: str | Path):
    """(HF config, padded vocabulary or None) of a `m2d convert` directory or a HF model directory."""
    from megatron_m2d.convert.provider import META, read_provider_config

    if (Path(path) / META).is_file():
        provider = read_provider_config(path)
        return provider.hf_config, provider.vocab_rows
    return read_hf_config(path), None


def read_hf_config(path: str | Path):
    """The config of a HF model directory (config.json only; weights need not be there)."""
    from megatron_m2d.io.checkpoint import Checkpoint

    path = Path(path)
    if not (path / "config.json").is_file():
        raise M2DError(f"{path} has neither m2d_convert.json nor config.json: not a model directory")
    return Checkpoint.read_config(path)  # the one config reader, with the message every command gives


def student_of(teacher_config, groups: int):
    """The HF config of the student `m2d densify --groups k` writes from this teacher (same rule as densify),
    for planning before the student exists."""
    from megatron_m2d.densification.export import dense_width
    from megatron_m2d.families import family_of

    family = family_of(teacher_config)
    if not 1 <= groups <= family.num_experts(teacher_config):
        raise M2DError(f"--groups {groups} must be between 1 and the {family.num_experts(teacher_config)} experts")
    _, width = dense_width(family, teacher_config, groups)
    # 'one_expert' (GPT-OSS, OLMoE): the family's own class with one expert of that width and top-1 routing
    return family.dense_config(teacher_config, width)
