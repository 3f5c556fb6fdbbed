"""Model configurations: the LLaMA-family hyper-parameters, named variants, and converters
from HF `config.json` and Meta `params.json` (GGUF metadata lives in `checkpoints/gguf.py`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmstack.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-family decoder. `head_dim` defaults to dim // n_heads.

    Family fields (defaults give LLaMA): `qkv_bias` (Qwen2), `qk_norm` (Qwen3: per-head RMSNorm on
    q and k before RoPE), `sliding_window` (Mistral: a query sees the last `sliding_window` positions,
    itself included; None = all), and Granite's `embedding_multiplier`, `residual_multiplier`,
    `attention_multiplier` (the SDPA scale; None = 1/sqrt(head_dim)) and `logits_scaling` (divisor)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    head_dim: int = 0
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0

    name: str = "custom"
    # Mixtral-style sparse MoE FFN (`fmstack.models.moe`): n_experts experts of width ffn_dim, each
    # token uses n_experts_per_token of them; 0 = the dense SwiGLU FFN.
    n_experts: int = 0
    n_experts_per_token: int = 0

    def __post_init__(self) -> None:
        if not self.head_dim:
            if self.n_heads <= 0 or self.dim % self.n_heads:
                raise ConfigError(
                    f"config {self.name!r}: dim={self.dim} is not divisible by n_heads={self.n_heads}"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config {self.name!r}: {key} must be positive, got {getattr(self, key)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"config {self.name!r}: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config {self.name!r}: head_dim={self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"config {self.name!r}: sliding_window must be a positive number of positions "
                              f"or None (full attention), got {self.sliding_window}")
        for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"config {self.name!r}: {key} must be positive, got {value}")
        self._check_experts()

    def _check_experts(self) -> None:
        e, k = self.n_experts, self.n_experts_per_token
        if (e, k) != (0, 0) and not (e >= 1 and 1 <= k <= e):
            raise ConfigError(f"config {self.name!r}: n_experts={e}, n_experts_per_token={k}; a MoE FFN needs "
                              "1 <= n_experts_per_token <= n_experts (both 0 for a dense FFN)")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        scaling = data.get("rope_scaling")
        if isinstance(scaling, dict):
            data["rope_scaling"] = RopeScaling(**scaling)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


def _llama2(name: str, dim: int, n_layers: int, n_heads: int, ffn_dim: int, n_kv_heads: int | None = None,
            **kw: Any) -> ModelConfig:
    return ModelConfig(name=name, vocab_size=kw.pop("vocab_size", 32000), dim=dim, n_layers=n_layers,
                       n_heads=n_heads, n_kv_heads=n_kv_heads or n_heads, ffn_dim=ffn_dim,
                       max_seq_len=kw.pop("max_seq_len", 4096), **kw)


_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)

NAMED_CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        _llama2("llama2-7b", 4096, 32, 32, 11008),
        _llama2("llama2-13b", 5120, 40, 40, 13824),
        _llama2("llama2-70b", 8192, 80, 64, 28672, n_kv_heads=8),
        _llama2("codellama-7b", 4096, 32, 32, 11008, vocab_size=32016, rope_theta=1e6, max_seq_len=16384),
        _llama2("llama3-8b", 4096, 32, 32, 14336, n_kv_heads=8, vocab_size=128256, rope_theta=5e5,
                max_seq_len=8192),
        _llama2("llama3.1-8b", 4096, 32, 32, 14336, n_kv_heads=8, vocab_size=128256, rope_theta=5e5,
                rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
        _llama2("llama3-70b", 8192, 80, 64, 28672, n_kv_heads=8, vocab_size=128256, rope_theta=5e5,
                max_seq_len=8192),
        ModelConfig(name="smollm2-135m", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                    ffn_dim=1536, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
        # Other families at their published shapes (HF config.json of each model).
        ModelConfig(name="qwen2.5-0.5b", vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                    ffn_dim=4864, norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768, tie_embeddings=True,
                    qkv_bias=True),
        ModelConfig(name="qwen2.5-7b", vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                    ffn_dim=18944, norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768, qkv_bias=True),
        ModelConfig(name="qwen3-0.6b", vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                    head_dim=128, ffn_dim=3072, norm_eps=1e-6, rope_theta=1e6, max_seq_len=40960,
                    tie_embeddings=True, qk_norm=True),
        ModelConfig(name="qwen3-8b", vocab_size=151936, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8,
                    head_dim=128, ffn_dim=12288, norm_eps=1e-6, rope_theta=1e6, max_seq_len=40960, qk_norm=True),
        ModelConfig(name="granite-3.1-2b", vocab_size=49155, dim=2048, n_layers=40, n_heads=32, n_kv_heads=8,
                    ffn_dim=8192, rope_theta=5e6, max_seq_len=131072, tie_embeddings=True,
                    embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                    logits_scaling=8.0),
        ModelConfig(name="granite-3.1-8b", vocab_size=49155, dim=4096, n_layers=40, n_heads=32, n_kv_heads=8,
                    ffn_dim=12800, rope_theta=1e7, max_seq_len=131072, tie_embeddings=True,
                    embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                    logits_scaling=16.0),
        ModelConfig(name="mistral-7b", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                    ffn_dim=14336, rope_theta=10000.0, max_seq_len=32768, sliding_window=4096),
        # Tiny test configs: a Llama-2 style (MHA, tied) and a Llama-3 style (GQA, scaled RoPE, untied).
        ModelConfig(name="tiny-mha", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=160,
                    max_seq_len=256, tie_embeddings=True),
        ModelConfig(name="tiny-gqa", vocab_size=512, dim=64, n_layers=3, n_heads=8, n_kv_heads=2, ffn_dim=192,
                    rope_theta=5e5, max_seq_len=256,
                    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position=64)),
        # Mixtral 8x7B (46.7B parameters, 12.9B active per token) and a tiny MoE for tests.
        _llama2("mixtral-8x7b", 4096, 32, 32, 14336, n_kv_heads=8, rope_theta=1e6, max_seq_len=32768,
                n_experts=8, n_experts_per_token=2),
        ModelConfig(name="tiny-moe", vocab_size=512, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=96,
                    rope_theta=1e6, max_seq_len=256, n_experts=4, n_experts_per_token=2),
    ]
}


def named_config(name: str) -> ModelConfig:
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown config {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}") from None


def _require(data: dict[str, Any], key: str, source: str) -> Any:
    if key not in data:
        raise ConfigError(f"{source}: missing required key {key!r}")
    return data[key]


# model_type -> the HF class fmstack mirrors (architectures are accepted by either name)
_HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                   "qwen3": "Qwen3ForCausalLM", "granite": "GraniteForCausalLM", "mixtral": "MixtralForCausalLM"}


def _hf_model_type(data: dict[str, Any], source: str) -> str:
    """The family of a HF config: its `model_type`, else the first known `architectures` entry."""
    arch = data.get("architectures") or []
    model_type = data.get("model_type")
    if model_type in _HF_MODEL_TYPES:
        return model_type
    for mt, cls in _HF_MODEL_TYPES.items():
        if cls in arch:
            return mt
    raise ConfigError(
        f"{source}: unknown architecture (model_type={model_type!r}, architectures={arch}); fmstack supports "
        f"model_type {', '.join(repr(m) for m in _HF_MODEL_TYPES)}"
    )


def _hf_family_fields(data: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """The ModelConfig family fields of a HF config, and clear errors for variants fmstack does not run."""
    if data.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported (the MLP has no biases)")
    if model_type != "qwen2" and data.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true (biases on q/k/v and o) is not supported; "
                          "only Qwen2's q/k/v bias is")
    fields: dict[str, Any] = {}
    if model_type == "qwen2":
        fields["qkv_bias"] = True  # Qwen2Attention always has q/k/v biases (o_proj none)
    if model_type == "qwen3":
        fields["qk_norm"] = True
    if model_type in ("qwen2", "qwen3") and data.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true (per-layer sliding windows) is not supported")
    if model_type in ("mistral", "mixtral") and data.get("sliding_window") is not None:
        fields["sliding_window"] = int(data["sliding_window"])
    if model_type == "granite":
        fields.update(embedding_multiplier=float(data.get("embedding_multiplier", 1.0)),
                      residual_multiplier=float(data.get("residual_multiplier", 1.0)),
                      attention_multiplier=float(data.get("attention_multiplier", 1.0)),
                      logits_scaling=float(data.get("logits_scaling", 1.0)))
    return fields


def _hf_experts(data: dict[str, Any], model_type: str, source: str) -> dict[str, int]:
    """MoE fields of a Mixtral config.json (`num_local_experts`, `num_experts_per_tok`); {} otherwise."""
    if model_type != "mixtral":
        return {}
    return {"n_experts": int(_require(data, "num_local_experts", source)),
            "n_experts_per_token": int(_require(data, "num_experts_per_tok", source))}


def from_hf_config(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a config from a HF `config.json` dict (model_type llama, mistral, qwen2, qwen3, granite, or
    mixtral: the sparse MoE FFN)."""
    model_type = _hf_model_type(data, source)
    n_heads = _require(data, "num_attention_heads", source)
    scaling = None
    rs = data.get("rope_scaling") or data.get("rope_parameters")
    if rs and (rs.get("rope_type") or rs.get("type")) == "llama3":
        scaling = RopeScaling(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                              high_freq_factor=float(rs["high_freq_factor"]),
                              original_max_position=int(rs["original_max_position_embeddings"]))
    elif rs and (rs.get("rope_type") or rs.get("type")) not in (None, "default"):
        raise ConfigError(f"{source}: unsupported rope_scaling type {rs.get('rope_type') or rs.get('type')!r}")
    theta = data.get("rope_theta")
    if theta is None and isinstance(rs, dict):
        theta = rs.get("rope_theta")
    return ModelConfig(
        name=data.get("_name_or_path") or "hf",
        vocab_size=_require(data, "vocab_size", source),
        dim=_require(data, "hidden_size", source),
        n_layers=_require(data, "num_hidden_layers", source),
        n_heads=n_heads,
        n_kv_heads=data.get("num_key_value_heads") or n_heads,
        ffn_dim=_require(data, "intermediate_size", source),
        norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta if theta is not None else 10000.0),
        rope_scaling=scaling,
        max_seq_len=int(data.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(data.get("tie_word_embeddings", False)),
        head_dim=int(data.get("head_dim") or 0),
        **_hf_family_fields(data, model_type, source),
        **_hf_experts(data, model_type, source),
    )


def from_meta_params(data: dict[str, Any], vocab_size: int | None = None,
                     source: str = "params.json") -> ModelConfig:
    """Build a config from a Meta `params.json` dict. The FFN width follows Meta's rounding rule."""
    dim = _require(data, "dim", source)
    n_heads = _require(data, "n_heads", source)
    vocab = data.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        if vocab_size is None:
            raise ConfigError(f"{source}: vocab_size is not set and could not be read from the weights")
        vocab = vocab_size
    multiple_of = int(data.get("multiple_of", 256))
    hidden = int(2 * (4 * dim) / 3)
    if data.get("ffn_dim_multiplier") is not None:
        hidden = int(float(data["ffn_dim_multiplier"]) * hidden)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    scaling = _LLAMA31_SCALING if data.get("use_scaled_rope") else None
    return ModelConfig(
        name="meta",
        vocab_size=int(vocab),
        dim=int(dim),
        n_layers=int(_require(data, "n_layers", source)),
        n_heads=int(n_heads),
        n_kv_heads=int(data.get("n_kv_heads") or n_heads),
        ffn_dim=int(data.get("ffn_dim", hidden)),
        norm_eps=float(data.get("norm_eps", 1e-5)),
        rope_theta=float(data.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=int(data.get("max_seq_len", 4096)),
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
