"""Model architecture config: one dataclass for every Granite family.

Field names follow transformers' config.json for Granite models, so `to_hf_dict` /
`from_hf_dict` are near-verbatim. The same dataclass is the Hydra schema of `model.arch`, so
field types stay OmegaConf-compatible (int/float/str/bool/Optional/List/Dict).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from granite_train.errors import UserError

log = logging.getLogger("granite_train.models")

# Families whose modeling code exists. The others are named so the error can say "not yet".
SUPPORTED_MODEL_TYPES = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid")
MOE_MODEL_TYPES = ("granitemoe", "granitemoeshared")
# Keys only the MoE families write to config.json.
_MOE_KEYS = ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef")
HYBRID_MODEL_TYPE = "granitemoehybrid"
# Keys only the hybrid family writes to config.json.
_HYBRID_KEYS = ("layer_types", "position_embedding_type", "mamba_n_heads", "mamba_n_groups",
                "mamba_d_state", "mamba_d_head", "mamba_d_conv", "mamba_expand", "mamba_chunk_size",
                "mamba_conv_bias", "mamba_proj_bias", "time_step_limit")
MIXER_TYPES = ("attention", "mamba")
# transformers 5 names the layer types "linear_attention"/"full_attention" in memory (and in a
# config.json it writes); transformers 4, vLLM and the published checkpoints use "mamba"/"attention",
# which transformers 5 remaps on load. We read both and write the latter.
_LAYER_TYPE_ALIASES = {"linear_attention": "mamba", "full_attention": "attention"}
KNOWN_MODEL_TYPES = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid")

# config.json keys that say nothing about the architecture: dropped on read, regenerated on write.
_REGENERATED_KEYS = {"architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                     "model_type", "rope_theta", "rope_parameters", "rope_scaling"}


@dataclass
class GraniteConfig:
    """Architecture of a Granite model.

    Field names and meanings follow transformers' Granite config.json so a config can be written
    out verbatim. `vocab_size: null` means "take it from the tokenizer".
    """

    model_type: str = "granite"
    vocab_size: Optional[int] = None
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # null: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    # Dropout on the attention probabilities in training (Granite 3.x configs carry 0.1 or 0.0).
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: Optional[float] = None  # null: 1/sqrt(head_dim)
    logits_scaling: float = 1.0
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    # MoE (granitemoe / granitemoeshared): `intermediate_size` is then each expert's hidden size.
    num_local_experts: int = 0  # 0: dense SwiGLU `mlp`
    num_experts_per_tok: int = 2
    shared_intermediate_size: int = 0  # granitemoeshared's always-on `shared_mlp`; 0: none
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss (the trainer adds it)
    # Hybrid (granitemoehybrid): per-layer sequence mixer, "mamba" or "attention" (null: all
    # attention for the other families). Every hybrid layer has `shared_mlp`, plus
    # `block_sparse_moe` when num_local_experts > 0.
    layer_types: Optional[List[str]] = None
    position_embedding_type: Optional[str] = None  # hybrids: "rope" or null (NoPE); others: RoPE
    mamba_n_heads: int = 128
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_head: Optional[int] = None  # null: mamba_expand * hidden_size // mamba_n_heads
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: List[float] = field(default_factory=lambda: [0.0, float("inf")])
    # config.json keys we do not model but that are harmless (e.g. use_cache, an eos_token_id
    # list): kept verbatim so a load/save round trip does not lose them.
    hf_extra: Dict[str, Any] = field(default_factory=dict)

    # ---- derived values (methods, not fields: Hydra overrides must not leave them stale) ----

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def softmax_scale(self) -> float:
        """Granite replaces 1/sqrt(head_dim) with `attention_multiplier` (a muP knob)."""
        if self.attention_multiplier is not None:
            return float(self.attention_multiplier)
        return 1.0 / math.sqrt(self.resolved_head_dim)

    @property
    def is_hybrid(self) -> bool:
        return self.model_type == HYBRID_MODEL_TYPE

    @property
    def uses_rope(self) -> bool:
        """Dense/MoE Granite always rotates q/k; hybrids only with position_embedding_type "rope"."""
        return not self.is_hybrid or self.position_embedding_type == "rope"

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def resolved_mamba_d_head(self) -> int:
        if self.mamba_d_head is not None:
            return self.mamba_d_head
        return self.mamba_d_inner // self.mamba_n_heads

    def mixer_type(self, layer_idx: int) -> str:
        """Sequence mixer of one decoder layer: "attention" or "mamba" (hybrids' `layer_types`)."""
        if self.layer_types is None:
            return "attention"
        return _LAYER_TYPE_ALIASES.get(self.layer_types[layer_idx], self.layer_types[layer_idx])

    def mlp_type(self) -> str:
        """Channel mixer of every decoder layer: "dense" SwiGLU, "moe", "moe+shared" or "shared"."""
        if self.is_hybrid:  # transformers' hybrid layer always has shared_mlp
            return "moe+shared" if self.num_local_experts > 0 else "shared"
        if self.num_local_experts > 0:
            return "moe+shared" if self.shared_intermediate_size > 0 else "moe"
        return "dense"

    def validate(self) -> None:
        """Raise one UserError line for a config we cannot build."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            _unsupported_model_type(self.model_type)
        if self.vocab_size is None or self.vocab_size <= 0:
            raise UserError(f"model vocab_size is {self.vocab_size}; set model.arch.vocab_size "
                            "(or null with a tokenizer, which fills it in)")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise UserError(f"attention_dropout={self.attention_dropout} must be in [0, 1); set "
                            "model.arch.attention_dropout=0.0")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads"):
            if getattr(self, name) <= 0:
                raise UserError(f"model {name}={getattr(self, name)} must be positive")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise UserError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}; pick a divisor")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise UserError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                            f"{self.num_attention_heads}; change one of them or set head_dim")
        if self.uses_rope and self.resolved_head_dim % 2 != 0:
            raise UserError(f"head_dim={self.resolved_head_dim} must be even for RoPE")
        if self.is_hybrid:
            self._validate_hybrid()
        else:
            self._validate_moe()
            if self.layer_types is not None and any(t != "attention" for t in self.layer_types):
                raise UserError(f"layer_types={list(self.layer_types)} needs model_type granitemoehybrid "
                                f"(got {self.model_type!r}); set model.arch.model_type")
        if self.hidden_act != "silu":
            raise UserError(f"hidden_act={self.hidden_act!r} is not supported (Granite uses silu); "
                            "set hidden_act to silu")

    def _validate_hybrid(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None or len(self.layer_types) != n:
            got = None if self.layer_types is None else len(self.layer_types)
            raise UserError(f"granitemoehybrid needs layer_types with num_hidden_layers={n} entries "
                            f"(got {got}); set model.arch.layer_types")
        bad = sorted({t for t in self.layer_types if _LAYER_TYPE_ALIASES.get(t, t) not in MIXER_TYPES})
        if bad:
            raise UserError(f"layer_types has unknown entries {bad} (allowed: mamba, attention); "
                            "fix model.arch.layer_types")
        if self.position_embedding_type not in (None, "rope"):
            raise UserError(f"position_embedding_type={self.position_embedding_type!r} is not supported "
                            "(rope or null); set model.arch.position_embedding_type")
        if self.head_dim is not None and self.head_dim != self.hidden_size // self.num_attention_heads:
            raise UserError("granitemoehybrid has no head_dim setting (it is hidden_size // "
                            "num_attention_heads); set model.arch.head_dim to null")
        if self.num_local_experts < 0:
            raise UserError(f"num_local_experts={self.num_local_experts} must be >= 0 (0: no experts)")
        if self.shared_intermediate_size <= 0:
            raise UserError(f"granitemoehybrid needs shared_intermediate_size > 0 (got "
                            f"{self.shared_intermediate_size}); set model.arch.shared_intermediate_size")
        self._validate_experts()
        for name in ("mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_expand",
                     "mamba_chunk_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"model {name}={getattr(self, name)} must be positive")
        d_inner, heads, groups = self.mamba_d_inner, self.mamba_n_heads, self.mamba_n_groups
        if d_inner % heads != 0 or self.resolved_mamba_d_head * heads != d_inner:
            raise UserError(f"mamba_n_heads={heads} x mamba_d_head={self.resolved_mamba_d_head} must equal "
                            f"mamba_expand * hidden_size = {d_inner}; fix the mamba sizes")
        if heads % groups != 0 or d_inner % groups != 0:
            raise UserError(f"mamba_n_groups={groups} must divide mamba_n_heads={heads}; fix model.arch.mamba_n_groups")
        if len(self.time_step_limit) != 2 or not 0 <= self.time_step_limit[0] <= self.time_step_limit[1]:
            raise UserError(f"time_step_limit={list(self.time_step_limit)} must be [min, max] with "
                            "0 <= min <= max; fix model.arch.time_step_limit")

    def _validate_moe(self) -> None:
        moe = self.model_type in MOE_MODEL_TYPES
        if moe and self.num_local_experts <= 0:
            raise UserError(f"model_type {self.model_type!r} needs num_local_experts > 0 "
                            f"(got {self.num_local_experts}); set model.arch.num_local_experts")
        if not moe and self.num_local_experts != 0:
            raise UserError(f"num_local_experts={self.num_local_experts} needs model_type granitemoe or "
                            f"granitemoeshared (got {self.model_type!r}); set model.arch.model_type")
        if not moe:
            if self.shared_intermediate_size != 0:
                raise UserError(f"shared_intermediate_size={self.shared_intermediate_size} needs model_type "
                                "granitemoeshared; set model.arch.model_type")
            return
        if self.model_type == "granitemoe" and self.shared_intermediate_size != 0:
            raise UserError(f"shared_intermediate_size={self.shared_intermediate_size} needs model_type "
                            "granitemoeshared (granitemoe has no shared MLP); set model.arch.model_type")
        if self.shared_intermediate_size < 0:
            raise UserError(f"shared_intermediate_size={self.shared_intermediate_size} must be >= 0")
        self._validate_experts()

    def _validate_experts(self) -> None:
        """What MoE layers and the hybrid's channel mixer both require."""
        if self.num_local_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise UserError(f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                            f"num_local_experts={self.num_local_experts}")
        if self.mlp_bias:
            raise UserError(f"mlp_bias=true is not supported for {self.model_type} (Granite experts and "
                            "shared MLPs have no bias); set model.arch.mlp_bias to false")
        if self.router_aux_loss_coef < 0:
            raise UserError(f"router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0")

    # ---- transformers config.json interop ----

    @classmethod
    def from_hf_dict(cls, d: Dict[str, Any]) -> "GraniteConfig":
        """Read a transformers config.json dict (transformers 4 or 5 layout)."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            _unsupported_model_type(model_type)
        _reject_unsupported_features(d)

        ours = {f.name for f in fields(cls)} - {"model_type", "rope_theta", "hf_extra"}
        # A key missing from config.json means transformers' default, not our random-init one
        # (e.g. tie_word_embeddings False, attention_multiplier 1.0): load the same model it does.
        kwargs: Dict[str, Any] = {k: v for k, v in HF_GRANITE_DEFAULTS.items() if k in ours}
        if model_type in MOE_MODEL_TYPES:
            kwargs.update(HF_GRANITEMOE_DEFAULTS)
        if model_type == HYBRID_MODEL_TYPE:
            kwargs.update(HF_GRANITEMOE_DEFAULTS)
            kwargs.update(HF_GRANITEMOEHYBRID_DEFAULTS)
            d = dict(d)
            if "layer_types" not in d and "layers_block_type" in d:  # older hybrid configs
                d["layer_types"] = d.pop("layers_block_type")
            if d.get("layer_types") is None:  # transformers' default: every layer Mamba
                d["layer_types"] = ["mamba"] * d.get("num_hidden_layers", HF_GRANITE_DEFAULTS["num_hidden_layers"])
            d["layer_types"] = [_LAYER_TYPE_ALIASES.get(t, t) for t in d["layer_types"]]
            if d.get("position_embedding_type") == "nope":  # the published Granite-4.0-H spelling of NoPE
                d["position_embedding_type"] = None
            heads = d.get("mamba_n_heads", HF_GRANITEMOEHYBRID_DEFAULTS["mamba_n_heads"])
            d_inner = (d.get("mamba_expand", HF_GRANITEMOEHYBRID_DEFAULTS["mamba_expand"])
                       * d.get("hidden_size", HF_GRANITE_DEFAULTS["hidden_size"]))
            if d.get("mamba_d_head") in ("auto", d_inner // heads):  # "auto": keep it derived
                d["mamba_d_head"] = None
            if d.get("time_step_limit") is None:  # transformers allows null: no clamping
                d["time_step_limit"] = [0.0, float("inf")]
            d["time_step_limit"] = [_json_float(v) for v in d["time_step_limit"]]
        kwargs.update({k: d[k] for k in ours if k in d})
        kwargs["model_type"] = model_type
        kwargs["rope_theta"] = float(_rope_theta(d))
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        # JSON writes 12.0 as 12; the dataclass (and OmegaConf) want floats.
        for f in fields(cls):
            if f.name in kwargs and f.type in ("float", "Optional[float]") and kwargs[f.name] is not None:
                kwargs[f.name] = float(kwargs[f.name])
        extra = {k: v for k, v in d.items() if k not in ours and k not in _REGENERATED_KEYS}
        # An eos list (some chat checkpoints) is not an Optional[int]: carry it verbatim.
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(key), list):
                extra[key] = kwargs.pop(key)
        harmless = {"use_cache", "pretraining_tp", "output_attentions",
                    "output_hidden_states", "return_dict", "eos_token_id", "bos_token_id",
                    "pad_token_id", "partial_rotary_factor", "sliding_window",
                    "output_router_logits", "layers_block_type",
                    "time_step_min", "time_step_max", "time_step_floor"}
        unknown = sorted(set(extra) - harmless)
        if unknown:
            log.warning("config.json keys not used by granite_train (kept for saving): %s",
                        ", ".join(unknown))
        return cls(**kwargs, hf_extra=extra)

    def to_hf_dict(self) -> Dict[str, Any]:
        """The config.json transformers writes for this model (without dtype/architectures)."""
        if self.vocab_size is None:
            raise UserError("cannot write config.json with vocab_size=null; set model.arch.vocab_size")
        d: Dict[str, Any] = dict(self.hf_extra)
        for f in fields(self):
            if f.name in ("hf_extra", "rope_theta", "head_dim", "attention_multiplier"):
                continue
            if (self.model_type not in (*MOE_MODEL_TYPES, HYBRID_MODEL_TYPE)
                    and f.name in (*_MOE_KEYS, "shared_intermediate_size")):
                continue  # a dense config.json stays exactly what transformers' Granite writes
            if not self.is_hybrid and f.name in _HYBRID_KEYS:
                continue
            if self.is_hybrid and f.name == "mlp_bias":
                continue
            if self.model_type == "granitemoe" and f.name in ("shared_intermediate_size", "mlp_bias"):
                continue
            if self.model_type == "granitemoeshared" and f.name == "mlp_bias":
                continue
            value = getattr(self, f.name)
            if f.name in ("bos_token_id", "eos_token_id", "pad_token_id") and value is None:
                d.setdefault(f.name, None)  # an extra (e.g. an eos list) wins over a null field
                continue
            d[f.name] = value
        if self.is_hybrid:
            d["layer_types"] = [self.mixer_type(i) for i in range(self.num_hidden_layers)]
            d["mamba_d_head"] = self.resolved_mamba_d_head
            d["time_step_limit"] = [float(v) for v in self.time_step_limit]
        # transformers' Granite default is 1.0, not 1/sqrt(head_dim): always write the number.
        d["attention_multiplier"] = self.softmax_scale
        if self.head_dim is not None and self.head_dim != self.hidden_size // self.num_attention_heads:
            d["head_dim"] = self.head_dim
        # transformers 5 reads rope_parameters; transformers 4 and vLLM read rope_theta.
        d["rope_theta"] = self.rope_theta
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        return dict(sorted(d.items()))


# transformers' GraniteConfig defaults for the keys a config.json may omit.
HF_GRANITE_DEFAULTS: Dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "embedding_multiplier": 1.0, "logits_scaling": 1.0,
    "residual_multiplier": 1.0, "attention_multiplier": 1.0, "bos_token_id": 1, "eos_token_id": 2,
}

# transformers' GraniteMoeConfig / GraniteMoeSharedConfig defaults for the MoE keys (the other
# keys share HF_GRANITE_DEFAULTS' values).
HF_GRANITEMOE_DEFAULTS: Dict[str, Any] = {
    "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001,
    "shared_intermediate_size": 0,
}


# transformers' GraniteMoeHybridConfig defaults where they differ from the two tables above.
HF_GRANITEMOEHYBRID_DEFAULTS: Dict[str, Any] = {
    "shared_intermediate_size": 1024, "position_embedding_type": None, "mamba_n_heads": 128,
    "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_head": None, "mamba_d_conv": 4,
    "mamba_expand": 2, "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_proj_bias": False,
    "time_step_limit": [0.0, float("inf")],
}


def _json_float(v: Any) -> float:
    """A float from config.json; transformers 5 writes infinity as {"__float__": "Infinity"}."""
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    return float(v)


def _unsupported_model_type(model_type: Any) -> None:
    if model_type in KNOWN_MODEL_TYPES:
        raise UserError(f"model_type {model_type!r} is not supported yet (supported: "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}); use a dense Granite checkpoint for now")
    raise UserError(f"model_type {model_type!r} is not a Granite model (supported: "
                    f"{', '.join(SUPPORTED_MODEL_TYPES)}); point model.path at a Granite checkpoint")


def _rope_theta(d: Dict[str, Any]) -> float:
    params = d.get("rope_parameters") or {}
    theta = params.get("rope_theta", d.get("rope_theta"))
    return GraniteConfig.rope_theta if theta is None else theta


def _reject_unsupported_features(d: Dict[str, Any]) -> None:
    """Keys whose non-default value would change the math: refuse rather than train wrong."""
    for key in ("rope_parameters", "rope_scaling"):
        params = d.get(key)
        if params and params.get("rope_type", params.get("type", "default")) != "default":
            raise UserError(f"config.json {key}.rope_type={params.get('rope_type', params.get('type'))!r} "
                            "is not supported (only default RoPE); remove the RoPE scaling from config.json")
    checks = {"partial_rotary_factor": 1.0, "pretraining_tp": 1,
              "sliding_window": None}
    for key, default in checks.items():
        if key in d and d[key] is not None and d[key] != default:
            raise UserError(f"config.json {key}={d[key]!r} is not supported (expected {default!r}); "
                            f"set it to {default!r} or use another checkpoint")
    if d.get("quantization_config") is not None:
        raise UserError("quantized checkpoints are not supported; point model.path at a bf16/fp32 checkpoint")
