"""Per-rank memory of a training run, before it runs: what `python -m granite_train.info --memory`
prints, and which settings fit a GPU.

Unlike DeepSpeed's `estimate_zero3_model_states_mem_needs` or `accelerate estimate-memory`, it
knows expert parallelism (each rank holds 1/EP of the experts, whose ZeRO group is world/EP),
context parallelism (a rank holds one slice of a row) and padding-free activations (a micro-batch
is `trainer.micro_batch_tokens` real tokens, no padding). Terms, per rank, bytes:

- weights, gradients, optimizer: the ZeRO paper's arithmetic as the stage shards them over the
  data-parallel group. DeepSpeed keeps fp32 masters whatever the compute dtype, so bf16 is
  2 + 2 + (4 + 4 + 4) B per parameter and fp32 4 + 4 + (4 + 4 + 4); the plain engine (no ZeRO)
  4 + 4 + 8 (its bf16 autocast keeps fp32 weights and casts them per forward);
- step buffer (ZeRO-1/2): the optimizer step flattens the rank's gradient partition (a copy in
  the gradients' dtype) and converts it to fp32 (another copy unless already fp32) next to the
  masters: 6 B per parameter of the partition in bf16, 4 in fp32;
- live set (ZeRO-3): the largest decoder layer gathered whole (an MoE layer's expert stack is
  one parameter) plus the full gradient of its largest parameter before the reduce-scatter; for
  the LM head the (tied) embedding gathered again with its full gradient;
- activations of one micro-batch: with activation checkpointing every layer's input plus one
  layer's working set (its widest per-token tensors, forward and backward), without it every
  layer's; MoE dispatch (the routed copies of the tokens, and the expert-parallel all-to-all
  buffers), the Mamba-2 chunk states, the LM head's logits (per `model.loss_chunk_tokens`);
- process: what a rank holds before its weights (CPU: torch, DeepSpeed and datasets, 0.45 GiB
  measured; CUDA: context and allocator slack, 0.75 GiB assumed until a GPU measures it).

Weights, gradients, optimizer, saved activations and the process are held through the step;
the rest belongs to one phase (a layer's backward, the LM head and loss, the optimizer step), and
`peak_gib_per_rank` is the held terms plus the largest phase (`peak_phase`). Checked against measured peaks on CPU (docs/benchmarks.md,
"The memory planner against measured peaks").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional

import torch

from granite_train.models.config import GraniteConfig

GIB = 2 ** 30
PROCESS_BYTES = {"cpu": int(0.45 * GIB), "cuda": int(0.75 * GIB)}


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model: parameter counts and the widths activations scale with."""

    params: int
    expert_params: int  # in the MoE expert stacks (split by expert parallelism)
    largest_layer: int  # parameters of the largest decoder layer (ZeRO-3 gathers it whole)
    largest_layer_param: int  # a layer's largest single parameter (its full gradient exists once)
    embedding: int  # the (tied) embedding: ZeRO-3 gathers it again for the LM head
    arch: GraniteConfig

    @classmethod
    def of(cls, arch: GraniteConfig) -> "Shape":
        from granite_train.models import build_model
        from granite_train.models.moe import ExpertWeight

        with torch.device("meta"):
            model = build_model(arch)
        expert = sum(m.weight.numel() for m in model.modules() if isinstance(m, ExpertWeight))
        layers = model.model.layers
        return cls(params=model.num_parameters(), expert_params=expert,
                   largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
                   largest_layer_param=max(p.numel() for layer in layers for p in layer.parameters()),
                   embedding=model.model.embed_tokens.weight.numel(), arch=arch)


@dataclass(frozen=True)
class Settings:
    world_size: int = 1
    zero_stage: Optional[int] = None  # None: the plain engine
    expert_parallel_size: int = 1
    context_parallel_size: int = 1
    dtype: str = "bf16"  # bf16 | fp32 (the compute dtype; auto resolved by the caller)
    micro_batch_tokens: int = 4096
    activation_checkpointing: bool = False
    loss_chunk_tokens: int = 0
    offload_optimizer: bool = False
    device: str = "cuda"  # cuda | cpu: only the process term differs


# The terms held through the whole step; each other term belongs to one phase of it, and the
# peak is the held terms plus the largest phase (the phases do not overlap in time).
HELD = ("weights", "gradients", "optimizer", "saved_activations", "process")
PHASES = {"layer": ("live_layer", "layer_working_set", "moe_dispatch", "mamba_states", "context_kv"),
          "lm_head": ("live_embedding", "logits"),
          "optimizer_step": ("step_buffer",)}


@dataclass
class MemoryPlan:
    settings: Settings
    bytes: Dict[str, int] = field(default_factory=dict)  # per rank, by term

    def phase_bytes(self) -> Dict[str, int]:
        return {name: sum(self.bytes[t] for t in terms) for name, terms in PHASES.items()}

    @property
    def peak_phase(self) -> str:
        phases = self.phase_bytes()
        return max(phases, key=phases.get)

    @property
    def peak_bytes(self) -> int:
        return sum(self.bytes[t] for t in HELD) + max(self.phase_bytes().values())

    @property
    def peak_gib_per_rank(self) -> float:
        return self.peak_bytes / GIB

    def to_json(self) -> Dict[str, Any]:
        return {"settings": asdict(self.settings), "bytes_per_rank": dict(self.bytes),
                "gib_per_rank": {k: round(v / GIB, 3) for k, v in self.bytes.items()},
                "phase_gib_per_rank": {k: round(v / GIB, 3) for k, v in self.phase_bytes().items()},
                "peak_phase": self.peak_phase, "peak_gib_per_rank": round(self.peak_gib_per_rank, 3)}


def _state_bytes(n: int, group: int, stage: Optional[int], dtype: str, offload: bool) -> Dict[str, float]:
    """Weights, gradients, optimizer state (and the ZeRO-1/2 step buffer) of `n` parameters
    sharded over a group of `group` ranks by `stage`."""
    if stage is None:  # plain data parallel: fp32 weights and gradients, Adam m and v
        return {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n, "step_buffer": 0}
    w = g = 2 if dtype == "bf16" else 4
    opt = 12  # fp32 master, m, v
    share = n / group
    weights = w * (share if stage == 3 else n)
    grads = g * (share if stage >= 2 else n)
    optim = opt * (share if stage >= 1 else n)
    # ZeRO-1/2's step flattens the partition's gradients (a copy in their dtype) and converts
    # that to fp32 (a second copy unless already fp32): deepspeed stage_1_and_2.py, step().
    step = (g + (4 if g != 4 else 0)) * share if stage in (1, 2) else 0
    if offload:  # optimizer state and step on the host
        optim, step = 0, 0
    return {"weights": weights, "gradients": grads, "optimizer": optim, "step_buffer": step}


def _activation_bytes(shape: Shape, s: Settings) -> Dict[str, float]:
    a = shape.arch
    t = s.micro_batch_tokens  # this rank's tokens (under context parallelism: its slice)
    b = 2 if s.dtype == "bf16" else 4
    h = a.hidden_size
    kinds = [a.mixer_type(i) for i in range(a.num_hidden_layers)]
    d_inner = a.mamba_n_heads * (a.mamba_d_head or a.mamba_expand * h // a.mamba_n_heads)
    mamba_proj = 2 * d_inner + 2 * a.mamba_n_groups * a.mamba_d_state + a.mamba_n_heads
    head_dim = a.head_dim or h // a.num_attention_heads
    attn = (a.num_attention_heads + 2 * a.num_key_value_heads) * head_dim + a.num_attention_heads * head_dim
    top_k = a.num_experts_per_tok if a.num_local_experts else 0
    channel = top_k * 3 * a.intermediate_size + 3 * (a.shared_intermediate_size or 0)
    if not a.num_local_experts:
        channel = 3 * a.intermediate_size
    # Per token and layer, the tensors a layer's backward needs (norms, projections, gates).
    per_layer = {"mamba": mamba_proj + 3 * d_inner, "attention": attn}
    per_token = {k: per_layer[k] + channel + 6 * h for k in set(kinds)}
    working = 2 * t * max(per_token.values()) * b  # one layer's forward + backward tensors
    if s.activation_checkpointing:  # every layer's input, one layer recomputed at a time
        saved, layer_working = len(kinds) * t * h * b, working
    else:
        saved, layer_working = sum(t * per_token[k] * b for k in kinds), working // 2
    dispatch = 0
    if top_k:  # routed copies of the tokens in and out, and the all-to-all send/receive buffers
        dispatch = 2 * t * top_k * h * b * (2 if s.expert_parallel_size > 1 else 1)
    mamba_states = 0
    if "mamba" in kinds:
        chunks = -(-t // a.mamba_chunk_size)
        per = chunks * a.mamba_n_heads * (d_inner // a.mamba_n_heads) * a.mamba_d_state * 4
        mamba_states = 2 * per * (1 if s.activation_checkpointing else kinds.count("mamba"))
    logits_rows = min(t, s.loss_chunk_tokens) if s.loss_chunk_tokens > 0 else t
    logits = logits_rows * a.vocab_size * (b + 8)  # the logits, their fp32 softmax and gradient
    kv = 0
    if s.context_parallel_size > 1 and "attention" in kinds:  # one layer's K/V of the whole row
        kv = 2 * s.context_parallel_size * t * a.num_key_value_heads * head_dim * b * 2
    return {"saved_activations": saved, "layer_working_set": layer_working, "moe_dispatch": dispatch,
            "mamba_states": mamba_states, "logits": logits, "context_kv": kv}


def plan(shape: Shape, s: Settings) -> MemoryPlan:
    """The per-rank bytes of one train step under `s` (see the module doc)."""
    dp = s.world_size  # ZeRO shards over every rank (context-parallel ranks too)
    dense = shape.params - shape.expert_params
    terms = _state_bytes(dense, dp, s.zero_stage, s.dtype, s.offload_optimizer)
    if shape.expert_params:
        experts = _state_bytes(shape.expert_params // s.expert_parallel_size, dp // s.expert_parallel_size,
                               s.zero_stage, s.dtype, s.offload_optimizer)
        terms = {k: terms[k] + experts[k] for k in terms}
    b = 2 if s.dtype == "bf16" else 4
    terms["live_layer"] = terms["live_embedding"] = 0
    if s.zero_stage == 3:  # gathered whole, with the full gradient of its largest parameter
        terms["live_layer"] = b * shape.largest_layer + b * shape.largest_layer_param
        terms["live_embedding"] = 2 * b * shape.embedding
    if s.zero_stage is None and s.dtype == "bf16":
        terms["live_layer"] = 2 * shape.params  # autocast casts every weight to bf16 once per forward
    terms.update(_activation_bytes(shape, s))
    terms["process"] = PROCESS_BYTES[s.device]
    return MemoryPlan(s, {k: int(v) for k, v in terms.items()})


def candidates(shape: Shape, base: Settings, max_world: int = 1024) -> Iterator[Settings]:
    """Settings to try, cheapest first: fewest ranks, then no offload, then the lower ZeRO stage,
    then expert parallelism (it needs ZeRO 0-2 here), then without activation checkpointing
    (faster) before with it."""
    experts = shape.arch.num_local_experts or 0
    world = 1
    while world <= max_world:
        for offload in (False, True):
            for stage in (None, 0, 1, 2, 3):
                if offload and stage in (None, 0):
                    continue
                eps = [1] + [e for e in (2, 4, 8, 16, 32, 64) if experts and e <= world and world % e == 0
                             and experts % e == 0 and stage != 3 and stage is not None]
                for ep in eps:
                    for ac in (False, True):
                        yield replace(base, world_size=world, zero_stage=stage, expert_parallel_size=ep,
                                      offload_optimizer=offload, activation_checkpointing=ac)
        world *= 2


def fitting(shape: Shape, base: Settings, gpu_gib: float, limit: int = 5) -> List[MemoryPlan]:
    """The `limit` cheapest settings whose peak fits `gpu_gib` per rank (at the fewest ranks
    that fit at all)."""
    found: List[MemoryPlan] = []
    for s in candidates(shape, base):
        if found and s.world_size > found[0].settings.world_size:
            break
        p = plan(shape, s)
        if p.peak_gib_per_rank <= gpu_gib:
            found.append(p)
            if len(found) == limit:
                break
    return found
