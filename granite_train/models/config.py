"""Model architecture config: one dataclass for every Granite family.

Field names follow transformers' config.json for Granite models, so `to_hf_dict` /
`from_hf_dict` are near-verbatim. The same dataclass is the Hydra schema of `model.arch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class GraniteConfig:
    """Architecture of a randomly initialised model (ignored when `model.path` is set).

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
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: Optional[float] = None  # null: 1/sqrt(head_dim)
    logits_scaling: float = 1.0


