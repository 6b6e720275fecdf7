"""Top-k mixture of experts and the shared MLP (granitemoe / granitemoeshared channel mixers).

Parameter names and shapes are transformers' on-disk ones:
`block_sparse_moe.router.layer.weight` [E, H], `block_sparse_moe.input_linear.weight` [E, 2I, H]
(output halves [gate | up]), `block_sparse_moe.output_linear.weight` [E, H, I];
`shared_mlp.input_linear.weight` [2S, H], `shared_mlp.output_linear.weight` [H, S].

Routing follows transformers' GraniteMoe router: logits = x @ W_r.T upcast to fp32, top-k on the
logits, softmax over the k selected logits (cast back to x's dtype) = combine weights.
Expert compute is grouped: the (token, slot) pairs are sorted by expert, each expert runs one
matmul on its contiguous slice (grouped GEMM on Hopper+ CUDA in bf16, else one matmul per
expert from split sizes read with one host sync), and the results go back to their tokens.

Where the experts run is the layer's dispatcher's business (`ExpertDispatcher`): by default every
expert is here (`local_dispatch`); expert parallelism (`granite_train/parallel/expert_parallel.py`)
keeps a slice of the experts and hands the layer a dispatcher that sends each row to the rank
holding its expert. The layer has one code path either way and knows nothing of ranks.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from granite_train.compat import grouped_mm_kernel
from granite_train.models.config import GraniteConfig
from granite_train.models.param_roles import HIDDEN, mark, mark_linear

# expert_fn(rows sorted by expert, rows per expert [n] (device), the same on the host or None)
ExpertFn = Callable[[torch.Tensor, torch.Tensor, Optional[List[int]]], torch.Tensor]


class ExpertDispatcher(Protocol):
    def __call__(self, x_MC: torch.Tensor, counts_E: torch.Tensor, expert_fn: ExpertFn,
                 host_sizes: bool) -> torch.Tensor:
        """Expert outputs for the rows of `x_MC` (sorted by expert, `counts_E` [E] rows each:
        E = all experts of the layer), in `x_MC`'s row order. `expert_fn` runs the experts held
        here on rows sorted by held expert; `host_sizes`: whether it wants the counts on the host
        (the per-expert loop does, grouped GEMM does not)."""


def local_dispatch(x_MC: torch.Tensor, counts_E: torch.Tensor, expert_fn: ExpertFn,
                   host_sizes: bool) -> torch.Tensor:
    """Every expert is held here: run them on the rows as they are."""
    return expert_fn(x_MC, counts_E, counts_E.tolist() if host_sizes else None)  # the one host sync


class ExpertWeight(nn.Module):
    """A stack of per-expert linear maps, `weight` [E, out, in] (no bias, as in Granite MoE)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        # The sizes are kept (as nn.Linear does): a sharded weight's shape is not them.
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        mark(self, "weight", HIDDEN)  # per expert a hidden matrix (fan-in grows with width)

    def forward(self, x_MC: torch.Tensor, counts_E: torch.Tensor, sizes: Optional[list]) -> torch.Tensor:
        """Rows sorted by expert (`counts_E` each) times their expert's matrix."""
        return grouped_expert_matmul(x_MC, self.weight, counts_E, sizes)

    def stacks(self) -> List[nn.Parameter]:
        """The parameters stacked over experts (sliced and gathered along dim 0 by expert
        parallelism): the weight, and a LoRA's factors (`lora.LoraExpertWeight`)."""
        return [self.weight]

    def keep(self, start: int, stop: int) -> None:
        """Hold only experts [start, stop) of the ones held now."""
        for p in self.stacks():
            owner, name = self._owner_of(p)
            # (the muP role is kept by the owning module, so it survives the new Parameter)
            setattr(owner, name, nn.Parameter(p.detach()[start:stop].clone(), requires_grad=p.requires_grad))
        self.num_experts = stop - start

    def _owner_of(self, p: nn.Parameter):
        for module in self.modules():
            for name, q in module.named_parameters(recurse=False, remove_duplicate=False):
                if q is p:
                    return module, name
        raise KeyError("parameter not held by this expert stack")

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}"


class Router(nn.Module):
    """`router.layer` is a bias-free Linear H -> E (transformers' on-disk name)."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)
        mark_linear(self.layer, HIDDEN)  # fan-in = hidden size: lr / m_width under muP


def _use_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    # Grouped GEMM: CUDA sm90+, bf16, 16-byte aligned rows. (Its CPU fallback exists in torch
    # 2.13 but its backward fails on empty groups, so the CPU keeps the per-expert loop.)
    return (x.is_cuda and grouped_mm_kernel() is not None and x.dtype == torch.bfloat16
            and w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and x.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0)


def grouped_expert_matmul(x_MC: torch.Tensor, w_EOC: torch.Tensor, counts_E: torch.Tensor,
                          sizes: Optional[list]) -> torch.Tensor:
    """Rows of `x_MC` sorted by expert (`counts_E` rows each) times their expert's `w[e].T`.

    `sizes` is `counts_E` on the host (None on the grouped-GEMM path, which needs no sync).
    Every expert runs, empty ones on zero rows, so each expert weight gets a (zero) gradient:
    data-parallel wrappers see every parameter used in every step.
    """
    if sizes is None:
        offs = counts_E.cumsum(0, dtype=torch.int32)
        return grouped_mm_kernel()(x_MC, w_EOC.transpose(-2, -1), offs=offs)
    # unbind, not w_EOC[e]: the backward of each indexing would build a zero-filled gradient the
    # size of the whole [E, O, C] stack (E fills and adds: most of a 64-expert step on CPU);
    # unbind's backward stacks the E gradients once.
    outs = [F.linear(chunk, w_OC) for w_OC, chunk in zip(w_EOC.unbind(0), x_MC.split(sizes))]
    return torch.cat(outs)


def awaiting_dispatch(x_MC: torch.Tensor, counts_E: torch.Tensor, expert_fn: ExpertFn, host_sizes: bool) -> torch.Tensor:
    """The dispatcher of a layer loaded with only its expert-parallel slice of the experts
    (`hf_io.load_model(experts=...)`) until `parallelize` gives it the real one."""
    raise RuntimeError("this MoE layer holds only an expert-parallel slice of its experts and has no dispatcher "
                       "yet: parallelize the model (distributed.expert_parallel_size) before running it")


def held_experts(model: nn.Module) -> Optional[range]:
    """The experts every MoE layer of `model` holds when that is a slice (expert parallelism),
    else None."""
    held = {m.held_experts for m in model.modules() if isinstance(m, MoE) and len(m.held_experts) != m.num_experts}
    if len(held) > 1:
        raise RuntimeError(f"MoE layers hold different expert slices: {sorted(held, key=lambda r: r.start)}")
    return held.pop() if held else None


# The expert stacks ([experts, ...]) among a checkpoint's keys: sliced when a rank holds a part.
EXPERT_KEYS = ("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight")


class MoE(nn.Module):
    """Sparse top-k mixture of SwiGLU experts (`block_sparse_moe`).

    After `keep_experts(experts, dispatch)` (expert parallelism) the layer holds only the
    experts in `experts` and `dispatch` brings every (token, slot) row to the holder of its
    expert; routing and everything it returns are unchanged.
    """

    def __init__(self, cfg: GraniteConfig) -> None:
        super().__init__()
        # All experts of the layer, wherever they are held. (transformers' config calls this
        # `num_local_experts`; here "local" would mean the experts held on this rank.)
        self.num_experts = cfg.num_local_experts
        self.top_k = cfg.num_experts_per_tok
        self.router = Router(cfg.hidden_size, self.num_experts)
        self.input_linear = ExpertWeight(self.num_experts, cfg.hidden_size, 2 * cfg.intermediate_size)
        self.output_linear = ExpertWeight(self.num_experts, cfg.intermediate_size, cfg.hidden_size)
        self.dispatch: ExpertDispatcher = local_dispatch
        self.held_experts = range(self.num_experts)

    def keep_experts(self, experts: range, dispatch: ExpertDispatcher) -> None:
        """Hold only `experts` (their weights sliced out of the full stacks) and route every row
        through `dispatch`."""
        held = self.held_experts
        if experts.step != 1 or not held.start <= experts.start < experts.stop <= held.stop:
            raise ValueError(f"experts {experts} are not a contiguous range of the experts held here ({held})")
        for w in (self.input_linear, self.output_linear):
            w.keep(experts.start - held.start, experts.stop - held.start)
        self.held_experts, self.dispatch = experts, dispatch

    def _experts(self, x_MC: torch.Tensor, counts_E: torch.Tensor, sizes: Optional[list]) -> torch.Tensor:
        """The experts held here on rows sorted by held expert."""
        gate_MI, up_MI = self.input_linear(x_MC, counts_E, sizes).chunk(2, dim=-1)
        return self.output_linear(F.silu(gate_MI) * up_MI, counts_E, sizes)

    def forward(self, x_BTC: torch.Tensor, real_tokens: Optional[int] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (output [B, T, C], stats [4, E] fp32; rows 1 and 3 carry grad).

        stats rows over the first `real_tokens` flattened tokens (all when None): 0 = top-k
        assignment counts per expert, 1 = sum of router softmax probabilities per expert (for the
        load-balancing loss), 2 = the number of tokens, 3 = sum of logsumexp(router logits)^2
        (for the z-loss); rows 2 and 3 hold the same value in every column.
        """
        B, T, C = x_BTC.shape
        x_NC = x_BTC.reshape(-1, C)
        N, E, k = x_NC.shape[0], self.num_experts, self.top_k

        logits_NE = self.router.layer(x_NC).float()  # a module call: a LoRA on the router applies
        topk_logits_NK, topk_idx_NK = logits_NE.topk(k, dim=-1)
        combine_NK = torch.softmax(topk_logits_NK, dim=-1).type_as(x_NC)

        with torch.no_grad():
            expert_M = topk_idx_NK.reshape(-1)  # M = N * k (token, slot) pairs
            order_M = torch.argsort(expert_M, stable=True)
            inverse_M = torch.empty_like(order_M)
            inverse_M[order_M] = torch.arange(order_M.numel(), device=order_M.device)
            counts_E = torch.bincount(expert_M, minlength=E)
        grouped = _use_grouped_mm(x_NC, self.input_linear.weight)
        x_MC = x_NC[order_M // k]
        y_MC = self.dispatch(x_MC, counts_E, self._experts, host_sizes=not grouped)
        # Back to (token, slot) order, then the combine-weighted sum over the k slots: the same
        # as a scatter-add into the tokens, without atomics (deterministic on GPU).
        y_NKC = y_MC[inverse_M].view(N, k, C)
        out_NC = (y_NKC * combine_NK.unsqueeze(-1)).sum(dim=1)

        n = N if real_tokens is None else min(real_tokens, N)
        with torch.no_grad():
            if n == N:
                real_counts = counts_E.float()
            else:
                real_counts = torch.bincount(topk_idx_NK[:n].reshape(-1), minlength=E).float()
        prob_sum_E = torch.softmax(logits_NE[:n], dim=-1).sum(dim=0)
        z_sum = torch.logsumexp(logits_NE[:n], dim=-1).pow(2).sum()
        stats = torch.stack([real_counts, prob_sum_E, real_counts.new_full((E,), float(n)), z_sum.expand(E)])
        return out_NC.view(B, T, C), stats


class SharedMLP(nn.Module):
    """Always-on SwiGLU (`shared_mlp`): `input_linear` [2S, H] halves [gate | up], `output_linear`."""

    def __init__(self, cfg: GraniteConfig) -> None:
        super().__init__()
        self.input_linear = nn.Linear(cfg.hidden_size, 2 * cfg.shared_intermediate_size, bias=False)
        self.output_linear = nn.Linear(cfg.shared_intermediate_size, cfg.hidden_size, bias=False)
        mark_linear(self.input_linear, HIDDEN)
        mark_linear(self.output_linear, HIDDEN)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        gate, up = self.input_linear(x_BTC).chunk(2, dim=-1)
        return self.output_linear(F.silu(gate) * up)


ROUTER_AUX_LOSSES = ("load_balancing", "switch_per_layer")


def router_z_loss(stats_LSE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): per layer mean over tokens of logsumexp(logits)^2, summed over layers."""
    return (stats_LSE[:, 3, 0] / stats_LSE[:, 2, 0].clamp_min(1.0)).sum()


def switch_per_layer_loss(stats_LSE: torch.Tensor) -> torch.Tensor:
    """lm-engine's switch loss: per layer E * sum_e normalize(P)_e * normalize(f)_e, summed over
    layers (= layers at uniform routing); P = router probabilities summed over tokens, f = top-k
    assignment counts, each normalised to sum to 1. Add the z-loss separately."""
    E = stats_LSE.shape[-1]
    p_LE = stats_LSE[:, 1] / stats_LSE[:, 1].sum(dim=-1, keepdim=True).clamp_min(1e-12)
    f_LE = stats_LSE[:, 0] / stats_LSE[:, 0].sum(dim=-1, keepdim=True).clamp_min(1.0)
    return E * (p_LE * f_LE).sum()


def router_aux_loss(stats_LSE: torch.Tensor, kind: str, z_loss_coef: float) -> torch.Tensor:
    """The unscaled router loss of one forward (the trainer multiplies it by
    `router_aux_loss_coef`): `kind` is one of ROUTER_AUX_LOSSES, plus `z_loss_coef` x z-loss."""
    if kind == "load_balancing":
        loss = load_balancing_loss(stats_LSE)
    elif kind == "switch_per_layer":
        loss = switch_per_layer_loss(stats_LSE)
    else:
        raise ValueError(f"router aux loss {kind!r} is not one of {ROUTER_AUX_LOSSES}")
    if z_loss_coef:
        loss = loss + z_loss_coef * router_z_loss(stats_LSE)
    return loss


def load_balancing_loss(stats_LSE: torch.Tensor) -> torch.Tensor:
    """transformers' `load_balancing_loss_func`, pooled over layers, from per-layer stats.

    f_e = (top-k assignments to e, all layers) / (tokens * layers); P_e = (sum of router
    probabilities of e, all layers) / (tokens * layers); loss = E * sum_e f_e * P_e (= top_k at
    uniform routing; f is not normalised by k in transformers' formula). Unscaled: multiply by
    `router_aux_loss_coef` before adding to the LM loss.
    """
    E = stats_LSE.shape[-1]
    rows = stats_LSE[:, 2, 0].sum().clamp_min(1.0)
    f_E = stats_LSE[:, 0].sum(dim=0) / rows
    p_E = stats_LSE[:, 1].sum(dim=0) / rows
    return E * (f_E * p_E).sum()
