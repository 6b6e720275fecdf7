"""Granite model code: one config-driven implementation for the Granite families.

Public API: `GraniteConfig`, `GraniteForCausalLM`, `build_model`, `load_model`, `save_model`.
"""

from granite_train.models.config import GraniteConfig
from granite_train.models.hf_io import load_model, read_config, save_model
from granite_train.models.loss import causal_lm_loss, chunked_causal_lm_loss
from granite_train.models.model import CausalLMOutput, GraniteForCausalLM, build_model

__all__ = ["GraniteConfig", "GraniteForCausalLM", "CausalLMOutput", "build_model", "load_model",
           "save_model", "read_config", "causal_lm_loss", "chunked_causal_lm_loss"]
