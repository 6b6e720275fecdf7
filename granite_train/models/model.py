"""Granite causal LM, padding-free first.

One config-driven implementation for every Granite family: each decoder layer is a sequence
mixer (attention now; Mamba-2 for hybrids) plus a channel mixer (dense SwiGLU, or top-k MoE
plus an optional shared MLP), both chosen from the config. Submodules carry transformers' on-disk names
(`self_attn`, `mlp`, ...), so our state_dict *is* the checkpoint layout: no key translation.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from granite_train.models.attention import (Attention, attn_backend_unavailable, check_attn_backend,
                                            resolve_attn_backend)
from granite_train.errors import UserError
from granite_train.models import context as cp_geometry
from granite_train.models.batch import SeqLayout, SequenceShard, segment_positions
from granite_train.models.config import GraniteConfig
from granite_train.models.mamba import Mamba2Mixer
from granite_train.models.mamba_kernels import BACKEND_NAMES as _MAMBA_BACKEND_NAMES
from granite_train.models.mamba_kernels import check_mamba_backend, resolve_mamba_backend
from granite_train.models.loss import causal_lm_loss, chunked_causal_lm_loss, trained_positions_loss
from granite_train.models.mlp import SwiGLU
from granite_train.models.moe import ROUTER_AUX_LOSSES, MoE, ExpertWeight, SharedMLP, router_aux_loss
from granite_train.models.norm import RMSNorm
from granite_train.models.param_roles import EMBEDDING, HIDDEN, OUTPUT, declared_role, mark, restamp
from granite_train.models.rope import rope_cos_sin

log = logging.getLogger("granite_train.models")

class CausalLMOutput(NamedTuple):
    # A NamedTuple, not a dataclass: ZeRO-3's module hooks find the tensors in a tuple (in an
    # unknown type they cannot, and the backward hooks of the root module would not fire).
    logits: Optional[torch.Tensor]  # [B, T, V], model dtype (bf16 under autocast); None if not asked
    loss: Optional[torch.Tensor] = None  # sum of token losses / trained tokens (fp32 scalar)
    # MoE families only (None for dense): the router loss over real tokens (transformers'
    # load-balancing formula by default, see `set_router_aux_loss`), unscaled (the trainer adds
    # `router_aux_loss_coef * aux_loss`; `loss` stays the LM loss),
    # and the top-k assignments per layer and expert [layers, E] (fp32, no grad) for logging.
    aux_loss: Optional[torch.Tensor] = None
    expert_counts: Optional[torch.Tensor] = None


class DecoderLayer(nn.Module):
    """`h += mixer(norm(h)) * m_res; h += mlp(norm(h)) * m_res`.

    The channel mixer is the dense SwiGLU `mlp`, or `block_sparse_moe` (+ `shared_mlp`).
    `forward` returns (h, router stats [3, E] or None; see `MoE.forward`).
    """

    def __init__(self, cfg: GraniteConfig, layer_idx: int) -> None:
        super().__init__()
        self.residual_multiplier = cfg.residual_multiplier
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mixer_kind = cfg.mixer_type(layer_idx)
        if self.mixer_kind == "attention":
            self.self_attn = Attention(cfg)
        elif self.mixer_kind == "mamba":
            self.mamba = Mamba2Mixer(cfg)
        else:
            raise NotImplementedError(f"mixer {self.mixer_kind!r}")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        mlp = cfg.mlp_type()
        if mlp == "dense":
            self.mlp = SwiGLU(cfg)
        elif mlp in ("moe", "moe+shared"):
            self.block_sparse_moe = MoE(cfg)
            if mlp == "moe+shared":
                self.shared_mlp = SharedMLP(cfg)
        elif mlp == "shared":  # a hybrid without experts
            self.shared_mlp = SharedMLP(cfg)
        else:
            raise NotImplementedError(f"mlp {mlp!r}")
        self.mlp_kind = mlp

    def mixer(self, x_BTC: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
        if self.mixer_kind == "mamba":
            return self.mamba(x_BTC, layout)
        return self.self_attn(x_BTC, layout)

    def channel_mixer(self, x_BTC: torch.Tensor, layout: SeqLayout
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.mlp_kind == "dense":
            return self.mlp(x_BTC), None
        if self.mlp_kind == "shared":
            return self.shared_mlp(x_BTC), None
        out_BTC, stats = self.block_sparse_moe(x_BTC, layout.real_tokens)
        if self.mlp_kind == "moe+shared":
            out_BTC = out_BTC + self.shared_mlp(x_BTC)
        return out_BTC, stats

    def forward(self, h_BTC: torch.Tensor, layout: SeqLayout
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        h_BTC = h_BTC + self.mixer(self.input_layernorm(h_BTC), layout) * self.residual_multiplier
        out_BTC, stats = self.channel_mixer(self.post_attention_layernorm(h_BTC), layout)
        return h_BTC + out_BTC * self.residual_multiplier, stats


class GraniteModel(nn.Module):
    """Embeddings, decoder layers and the final norm (transformers' `model.` prefix)."""

    def __init__(self, cfg: GraniteConfig) -> None:
        super().__init__()
        assert cfg.vocab_size is not None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        mark(self.embed_tokens, "weight", EMBEDDING)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GraniteForCausalLM(nn.Module):
    """Granite LM (dense or MoE) with a padding-free forward.

    `attn_backend`: "auto" (on CUDA flash-attn varlen when installed, else torch's varlen
    kernels; per-example SDPA elsewhere), "sdpa", "flash" or "varlen". `mamba_backend`: "auto" (on CUDA the first of "cuda" = causal-conv1d + mamba-ssm and
    "triton" = fla-core + mamba-ssm that is installed, else the exact PyTorch path), "torch",
    "cuda" or "triton" (see `mamba_kernels`). `activation_checkpointing`: recompute each decoder layer in backward.
    """

    def __init__(self, config: GraniteConfig, attn_backend: str = "auto",
                 activation_checkpointing: bool = False, mamba_backend: str = "auto") -> None:
        super().__init__()
        config.validate()
        check_attn_backend(attn_backend)
        check_mamba_backend(mamba_backend)
        self.config = config
        self.attn_backend = attn_backend
        self.mamba_backend = mamba_backend
        self._mamba_by_device: Dict[str, str] = {}  # like _backend_by_device, for Mamba-2 layers
        self.activation_checkpointing = activation_checkpointing
        # Make the embedding output require grad, so every layer's backward runs even when the
        # weights below it are frozen (adapters): ZeRO-3 releases a leaf module's weights when
        # its inputs' gradients are done, which never happens for an input without grad.
        self.input_grads = False
        self._backend_by_device: Dict[str, str] = {}  # resolved once per device type, logged once
        # Built on the meta device, then allocated and drawn once by `reset_parameters`: the
        # random init is that pass alone (no default inits drawn first), so a model drawn piece
        # by piece (`hf_io.init_model`, ZeRO-3) is the same model from the same seed.
        device = torch.get_default_device()
        with torch.device("meta"):
            self.model = GraniteModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Untied: muP's output layer (base lr and init; the 1/m_width is `logits_scaling`, see
        # param_roles). Tied: it is the embedding.
        mark(self.lm_head, "weight", EMBEDDING if config.tie_word_embeddings else OUTPUT)
        self.mup_width: Optional[float] = None  # muP width multiplier, see `apply_mup`
        if device.type != "meta":
            self.to_empty(device=device)
            restamp(self)
        self.tie_weights()
        if device.type != "meta":
            self.reset_parameters()
        self.set_router_aux_loss()

    # ---- setup ----

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self, modules: Optional[Iterable[nn.Module]] = None) -> None:
        """normal(0, initializer_range) for matrices and embeddings, zero biases, unit norms.
        Under muP (`apply_mup`) hidden matrices get std initializer_range / sqrt(m_width).
        `modules`: only these (in this order; `hf_io.init_model` draws a piece at a time)."""
        std = self.config.initializer_range
        hidden_std = std / math.sqrt(self.mup_width) if self.mup_width else std
        for module in self.modules() if modules is None else modules:
            if isinstance(module, (nn.Linear, nn.Embedding, ExpertWeight)):
                w_std = hidden_std if declared_role(module, "weight") == HIDDEN else std
                nn.init.normal_(module.weight, mean=0.0, std=w_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, Mamba2Mixer)):
                module.reset_parameters()

    def apply_mup(self, m_width: Optional[float], reinit: bool = True) -> None:
        """Switch muP on with width multiplier `m_width` (None: off). `reinit` re-draws the weights
        with the muP init (hidden matrices std initializer_range / sqrt(m_width)); pass False when
        the weights come from a checkpoint. The per-role lr scales live in the optimizer's param
        groups (`granite_train.optim`); the output multiplier is `config.logits_scaling`."""
        self.mup_width = None if m_width is None else float(m_width)
        if reinit:
            self.reset_parameters()

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.activation_checkpointing = enabled

    def set_router_aux_loss(self, kind: str = "load_balancing", z_loss_coef: Optional[float] = None) -> None:
        """Which router loss `forward` returns as `aux_loss` (MoE models): "load_balancing"
        (transformers' formula, pooled over layers; the default) or "switch_per_layer"
        (lm-engine's, per layer and summed). `z_loss_coef` adds that multiple of the router
        z-loss; None means 0.1 with switch_per_layer (lm-engine) and 0 with load_balancing."""
        if kind not in ROUTER_AUX_LOSSES:
            raise ValueError(f"router aux loss {kind!r} is not one of {', '.join(ROUTER_AUX_LOSSES)}")
        self.router_loss_kind = kind
        self.router_z_loss_coef = (0.1 if kind == "switch_per_layer" else 0.0) if z_loss_coef is None else z_loss_coef

    # ---- accounting ----

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied lm_head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def active_matmul_params(self) -> int:
        """Weights one token multiplies with (lm_head included even when tied; MoE: the active
        experts' share). Count it on the full model: after expert parallelism or ZeRO-3 sharding
        a rank holds only part of the weights (the trainer counts once, before)."""
        c = self.config
        matmul_params = self.num_parameters(exclude_embeddings=True)
        if c.tie_word_embeddings:
            matmul_params += self.lm_head.weight.numel()
        if c.num_local_experts > 0:
            expert_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, ExpertWeight))
            matmul_params -= expert_params * (c.num_local_experts - c.num_experts_per_tok) // c.num_local_experts
        return matmul_params

    def flops_per_token(self, seq_len: int, matmul_params: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM convention.

        6 * (matmul parameters, lm_head included even when tied) + 12 * layers * heads * head_dim
        * seq_len for attention scores and values (no causal halving). For packed batches pass
        the token-weighted mean example length, since attention never crosses examples.
        MoE: only the active experts count (num_experts_per_tok of num_local_experts).
        Mamba-2 (chunked SSD, chunk Q = min(mamba_chunk_size, seq_len), per head): scores C.B and
        their product with x inside the chunk (Q * (N + P) MACs), the chunk state and the state's
        output (2 * P * N MACs): 6 * heads * (Q * (N + P) + 2 * P * N) per layer. The depthwise
        conv is already in the parameter term (one MAC per weight per token).
        `matmul_params`: `active_matmul_params()` counted before (else counted now).
        """
        c = self.config
        if matmul_params is None:
            matmul_params = self.active_matmul_params()
        attn_layers = sum(c.mixer_type(i) == "attention" for i in range(c.num_hidden_layers))
        attn = 12 * attn_layers * c.num_attention_heads * c.resolved_head_dim * seq_len
        ssd = 0
        mamba_layers = sum(c.mixer_type(i) == "mamba" for i in range(c.num_hidden_layers))
        if mamba_layers:
            Q, N, P = min(c.mamba_chunk_size, seq_len), c.mamba_d_state, c.resolved_mamba_d_head
            ssd = 6 * mamba_layers * c.mamba_n_heads * (Q * (N + P) + 2 * P * N)
        return 6.0 * matmul_params + attn + ssd

    # ---- forward ----

    def _layout(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor],
                seq_idx: Optional[torch.Tensor], cu_seq_lens: Optional[torch.Tensor],
                context: Optional[SequenceShard] = None) -> SeqLayout:
        """Backend, RoPE tables and example boundaries for this forward (the one host sync)."""
        if context is not None:
            return self._context_layout(input_ids, context)
        B, T = input_ids.shape
        device = input_ids.device
        backend, mamba_backend = self.resolve_backends(device)

        if cu_seq_lens is None and seq_idx is not None and B == 1:
            # Only seq_idx given: boundaries from the explicit example index (never from tokens).
            counts = torch.unique_consecutive(seq_idx.reshape(-1), return_counts=True)[1]
            cu_seq_lens = F.pad(counts.cumsum(0), (1, 0))
        bounds = max_len = real_tokens = None
        if cu_seq_lens is not None:
            if B != 1:
                raise ValueError(f"cu_seq_lens needs one packed row, got input_ids of shape {tuple(input_ids.shape)}")
            bounds = [int(b) for b in cu_seq_lens.reshape(-1).tolist()]  # the one host sync
            if bounds[0] != 0 or bounds[-1] > T or any(b > e for b, e in zip(bounds[:-1], bounds[1:])):
                raise ValueError(f"cu_seq_lens must rise from 0 to at most T={T}, got {bounds}")
            if bounds[-1] < T:  # trailing filler: attend it as one more (untrained) segment
                real_tokens = bounds[-1]  # ... and keep it out of the router statistics
                bounds.append(T)
            max_len = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
            if (len(bounds) != cu_seq_lens.numel() or cu_seq_lens.dtype != torch.int32
                    or cu_seq_lens.device != device):
                cu_seq_lens = torch.tensor(bounds, dtype=torch.int32, device=device)
            if position_ids is None:  # restart positions at every example
                position_ids = segment_positions(bounds, device)[1]
        if position_ids is None:
            position_ids = torch.arange(T, device=device).unsqueeze(0).expand(B, T)

        cos_BTD = sin_BTD = None
        if self.config.uses_rope:
            cos_BTD, sin_BTD = rope_cos_sin(position_ids, self.config.resolved_head_dim, self.config.rope_theta)
        return SeqLayout(attn_backend=backend, mamba_backend=mamba_backend, cos_BTD=cos_BTD, sin_BTD=sin_BTD,
                         cu_seq_lens=cu_seq_lens, bounds=bounds, max_seq_len=max_len, seq_idx=seq_idx,
                         real_tokens=real_tokens)

    def resolve_backends(self, device: torch.device) -> Tuple[str, str]:
        """(attention, Mamba-2) kernels for `device`, resolved and logged once per device type."""
        backend = self._backend_by_device.get(device.type)
        if backend is None:
            backend = resolve_attn_backend(self.attn_backend, device, self.config.attention_dropout)
            self._backend_by_device[device.type] = backend
            if device.type == "cuda" and backend == "sdpa" and self.attn_backend == "auto":
                whys = "; ".join(f"{name}: {attn_backend_unavailable(name, device, self.config.attention_dropout)}"
                                 for name in ("flash", "varlen"))
                log.warning("attention backend: %s, one call per example, NOT a fused varlen kernel: %s "
                            "(model.attn_backend=auto, device cuda)", _BACKEND_NAMES[backend], whys)
            else:
                log.info("attention backend: %s (model.attn_backend=%s, device %s)",
                         _BACKEND_NAMES[backend], self.attn_backend, device.type)
        return backend, self._resolve_mamba_backend(device)

    def _context_layout(self, input_ids: torch.Tensor, shard: SequenceShard) -> SeqLayout:
        """The layout of one context-parallel slice: its own boundaries (no host sync: the shard
        holds the row's), positions counted from each example's start in the whole row."""
        B, T = input_ids.shape
        if B != 1 or T != shard.slice_len:
            raise ValueError(f"a context-parallel slice is input_ids [1, {shard.slice_len}], got {tuple(input_ids.shape)}")
        c = self.config
        if any(c.mixer_type(i) == "mamba" for i in range(c.num_hidden_layers)) and T < c.mamba_d_conv - 1:
            raise UserError(f"a context-parallel slice of {T} tokens is shorter than the Mamba conv's halo "
                            f"(mamba_d_conv - 1 = {c.mamba_d_conv - 1}); raise trainer.micro_batch_tokens")
        device = input_ids.device
        attn_backend, mamba_backend = self.resolve_backends(device)
        bounds = cp_geometry.local_bounds(shard)
        position_ids = cp_geometry.global_positions(shard, device)
        cos_BTD = sin_BTD = None
        if self.config.uses_rope:
            cos_BTD, sin_BTD = rope_cos_sin(position_ids, self.config.resolved_head_dim, self.config.rope_theta)
        real = shard.real_tokens - shard.offset
        return SeqLayout(attn_backend=attn_backend, mamba_backend=mamba_backend, cos_BTD=cos_BTD, sin_BTD=sin_BTD,
                         cu_seq_lens=torch.tensor(bounds, dtype=torch.int32, device=device), bounds=bounds,
                         max_seq_len=max(e - s for s, e in zip(bounds[:-1], bounds[1:])),
                         real_tokens=min(max(real, 0), T) if real < T else None, context=shard)

    def _resolve_mamba_backend(self, device: torch.device) -> str:
        """Mamba-2 kernels for `device`, resolved and logged once per device type (hybrids only)."""
        backend = self._mamba_by_device.get(device.type)
        if backend is None:
            c = self.config
            if not any(c.mixer_type(i) == "mamba" for i in range(c.num_hidden_layers)):
                backend = "torch"  # no Mamba layers: nothing to choose, nothing to log
            else:
                backend, why = resolve_mamba_backend(self.mamba_backend, device, c.mamba_d_conv)
                if why is not None:  # CUDA device, kernels wanted (auto) but they cannot run
                    log.warning("mamba backend: %s, NOT the fast kernels: %s (model.mamba_backend=%s, "
                                "device %s); this path is much slower", _MAMBA_BACKEND_NAMES[backend], why,
                                self.mamba_backend, device.type)
                else:
                    log.info("mamba backend: %s (model.mamba_backend=%s, device %s)",
                             _MAMBA_BACKEND_NAMES[backend], self.mamba_backend, device.type)
            self._mamba_by_device[device.type] = backend
        return backend

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                seq_idx: Optional[torch.Tensor] = None, cu_seq_lens: Optional[torch.Tensor] = None,
                max_seq_len: Optional[Union[int, torch.Tensor]] = None,
                labels: Optional[torch.Tensor] = None, loss_chunk_tokens: int = 0,
                return_logits: bool = True, context: Optional[SequenceShard] = None) -> CausalLMOutput:
        """Packed: input_ids [1, T] with `cu_seq_lens` [n+1] int32 (attention stays per example).
        Padded: input_ids [B, L] right-padded, no `cu_seq_lens`. `max_seq_len` is accepted for
        collator compatibility and recomputed from `cu_seq_lens`. Labels are not pre-shifted.
        `loss_chunk_tokens=N > 0` (with labels) computes the loss N tokens at a time without
        materialising the [B, T, V] logits (a memory knob; `.logits` is then None).
        `return_logits=False` (with labels; what the trainer uses) computes logits only where a
        token is trained, so prompt tokens cost no lm_head work (`.logits` is then None).
        `context` (context parallelism): input_ids [1, slice_len] is one slice of the shard's row;
        the boundaries and positions come from the shard, labels are targets already (shifted
        over the whole row, `parallel.context_parallel.shard_row`), the loss is this slice's mean
        and the router aux loss the whole row's (the same on every rank of the group)."""
        del max_seq_len  # derived from the host copy of cu_seq_lens, which we need anyway
        layout = self._layout(input_ids, position_ids, seq_idx, cu_seq_lens, context)
        shifted = context is not None

        h_BTC = self.model.embed_tokens(input_ids) * self.config.embedding_multiplier
        if self.input_grads and torch.is_grad_enabled() and not h_BTC.requires_grad:
            h_BTC = h_BTC.detach().requires_grad_()
        stats = []
        for layer in self.model.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h_BTC, s = checkpoint(layer, h_BTC, layout, use_reentrant=False)
            else:
                h_BTC, s = layer(h_BTC, layout)
            if s is not None:
                stats.append(s)
        aux_loss = expert_counts = None
        if stats:
            stats_LSE = torch.stack(stats)
            expert_counts = stats_LSE[:, 0].detach()  # this slice's own: the trainer sums ranks
            if context is not None:  # the router loss of the whole row, from its summed statistics
                stats_LSE = context.sum(stats_LSE)
            aux_loss = router_aux_loss(stats_LSE, self.router_loss_kind, self.router_z_loss_coef)
        # Dividing the [B, T, C] hidden state instead of the [B, T, V] logits is the same linear
        # map and saves a vocabulary-sized pass (and its backward).
        h_BTC = self.model.norm(h_BTC) / self.config.logits_scaling
        if labels is not None and not return_logits:
            loss = trained_positions_loss(h_BTC, self.lm_head.weight, labels, loss_chunk_tokens, shifted)
            return CausalLMOutput(logits=None, loss=loss, aux_loss=aux_loss, expert_counts=expert_counts)
        if loss_chunk_tokens > 0 and labels is not None:
            loss = chunked_causal_lm_loss(h_BTC, self.lm_head.weight, labels, loss_chunk_tokens, shifted)
            return CausalLMOutput(logits=None, loss=loss, aux_loss=aux_loss, expert_counts=expert_counts)
        logits_BTV = self.lm_head(h_BTC)
        loss = causal_lm_loss(logits_BTV, labels, shifted) if labels is not None else None
        return CausalLMOutput(logits=logits_BTV, loss=loss, aux_loss=aux_loss, expert_counts=expert_counts)


_BACKEND_NAMES = {"flash": "flash_attn_varlen_func", "varlen": "torch.nn.attention.varlen.varlen_attn",
                  "sdpa": "per-example scaled_dot_product_attention"}


def full_size(cfg: GraniteConfig) -> Tuple[int, int]:
    """(parameters, active matmul parameters) of the whole model, counted on a meta-device copy:
    right whatever part of the weights this rank holds (ZeRO-3, expert parallelism)."""
    with torch.device("meta"):
        model = GraniteForCausalLM(cfg)
    return model.num_parameters(), model.active_matmul_params()


def build_model(cfg: GraniteConfig, attn_backend: str = "auto",
                activation_checkpointing: bool = False, mamba_backend: str = "auto") -> GraniteForCausalLM:
    """A randomly initialised model for `cfg` (fp32, CPU; move it with `.to`)."""
    return GraniteForCausalLM(cfg, attn_backend=attn_backend, activation_checkpointing=activation_checkpointing,
                              mamba_backend=mamba_backend)


__all__: List[str] = ["CausalLMOutput", "GraniteForCausalLM", "GraniteModel", "DecoderLayer",
                      "build_model", "full_size"]
