"""One bf16 train step of each Granite family against the same step in fp32.

The model runs with the backends `auto` picks on this device (on a GPU: the fused attention and
Mamba kernels inside the whole model), on a packed row; bf16 is autocast over fp32 weights, as
`trainer.dtype=bf16` trains on the plain engine. What is compared: the loss (with the router's
aux loss) and the whole gradient, ||g_bf16 - g_fp32|| / ||g_fp32||.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from granite_train.models import GraniteConfig, GraniteForCausalLM

FAMILIES = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid")
# bf16's 8-bit mantissa through three layers: measured on CPU (2026-12-07) at most 2.3e-5 (loss)
# and 6.7e-3 (gradient) on these shapes; the bounds leave room for the GPU kernels' rounding.
LOSS_TOLERANCE, GRAD_TOLERANCE = 1e-2, 5e-2


@dataclass
class StepCheck:
    family: str
    attn_backend: str
    mamba_backend: Optional[str]
    loss_fp32: float
    loss_bf16: float
    loss_rel_err: float
    grad_rel_err: float
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.loss_rel_err <= LOSS_TOLERANCE and self.grad_rel_err <= GRAD_TOLERANCE)


def family_config(family: str, device: torch.device) -> GraniteConfig:
    """A few layers of the family: small on CPU; on CUDA wide enough for the fused kernels'
    real tiles (hidden 1024, head dim 128, 8 experts, Mamba 32 x 64 with state 128)."""
    big = device.type == "cuda"
    kw: Dict[str, Any] = dict(
        model_type=family, vocab_size=4096 if big else 256, hidden_size=1024 if big else 64,
        intermediate_size=2048 if big else 96, num_hidden_layers=3, num_attention_heads=8 if big else 4,
        num_key_value_heads=2, max_position_embeddings=8192, embedding_multiplier=12.0,
        residual_multiplier=0.22, attention_multiplier=1 / 128 if big else 1 / 16, logits_scaling=6.0,
        initializer_range=0.02 if big else 0.1, tie_word_embeddings=True)
    if family != "granite":
        kw.update(num_local_experts=8 if big else 4, num_experts_per_tok=2,
                  intermediate_size=512 if big else 32)
    if family in ("granitemoeshared", "granitemoehybrid"):
        kw.update(shared_intermediate_size=1024 if big else 64)
    if family == "granitemoehybrid":
        kw.update(layer_types=["mamba", "attention", "mamba"], mamba_n_heads=32 if big else 4,
                  mamba_d_head=64 if big else 32, mamba_d_state=128 if big else 16,
                  mamba_chunk_size=256 if big else 16, mamba_d_conv=4, position_embedding_type=None)
    else:
        kw.update(rope_theta=10000.0)
    return GraniteConfig(**kw)


def _loss_and_grads(model: GraniteForCausalLM, ids: torch.Tensor, cu: torch.Tensor,
                    dtype: Optional[torch.dtype]) -> tuple:
    model.zero_grad(set_to_none=True)
    device = ids.device
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(input_ids=ids, cu_seq_lens=cu, labels=ids, return_logits=False)
    loss = out.loss if out.aux_loss is None else out.loss + 0.01 * out.aux_loss
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1).float() for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), grads


def check_family_step(family: str, device: torch.device, lengths: Sequence[int],
                      attn_backend: str = "auto", mamba_backend: str = "auto") -> StepCheck:
    cfg = family_config(family, device)
    torch.manual_seed(0)
    model = GraniteForCausalLM(cfg, attn_backend=attn_backend, mamba_backend=mamba_backend).to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (1, sum(lengths)), generator=g).to(device)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    loss32, g32 = _loss_and_grads(model, ids, cu, None)
    loss16, g16 = _loss_and_grads(model, ids, cu, torch.bfloat16)
    attn, mamba = model.resolve_backends(device)
    return StepCheck(family, attn, mamba if family == "granitemoehybrid" else None, loss32, loss16,
                     abs(loss16 - loss32) / abs(loss32), float((g16 - g32).norm() / g32.norm()))


def check_steps(device: torch.device, lengths: Sequence[int], attn_backend: str = "auto",
                mamba_backend: str = "auto") -> List[StepCheck]:
    results = []
    for family in FAMILIES:
        try:
            results.append(check_family_step(family, device, lengths, attn_backend, mamba_backend))
        except Exception as exc:  # reported by family, the other families still run
            nan = float("nan")
            results.append(StepCheck(family, attn_backend, None, nan, nan, nan, nan,
                                     error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
    return results
