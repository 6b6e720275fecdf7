"""Learning-rate schedules as pure functions of (step, tokens_seen).

`lr_at(step, tokens_seen)` is the lr the optimizer uses for optimizer step `step` (0-based), where
`tokens_seen` is the number of input tokens trained *before* that step (padding excluded). The
trainer sets it on every param group before each step, so what metrics.jsonl reports is what was
applied. There is no hidden state: a resumed run gets the same lr from the same (step, tokens).
`python -m granite_train.plot_lr` evaluates this same object (`Schedule.from_config`). It sits
beside config.py, below train/, because the config's validation builds one too.

Step-based schedules (`cosine`, `linear`, `constant`; unchanged): linear warmup over
`warmup_steps` steps (step k gets `lr * (k + 1) / warmup_steps`), then cosine/linear decay to
`lr * min_lr_ratio` at the last step, or a constant lr. `warmup_tokens`, when set (not null),
wins over `warmup_steps` and is rounded up to whole steps of `trainer.tokens_per_step`.

Token-based schedules (`power`, `wsd`), all counted in input tokens `n`:

* Power scheduler (Shen et al., arXiv 2408.13359, Eq. 7 and 8):
  `lr_power(n) = min(lr_max, a * beta * n**b)` with `lr_max = optim.lr`, `beta` =
  `scheduler.batch_size` (sequences per step; null: `trainer.tokens_per_step / 4096`);
  warmup `n < N_w`: `(n / N_w) * lr_power(N_w)`; stable: `lr_power(n)`; decay over the last
  `N_d` tokens of the run (`N` = `trainer.max_tokens`, or `max_steps * tokens_per_step`):
  `min_lr + (lr_power(N - N_d) - min_lr) * g(p)`, `p = (n - (N - N_d)) / N_d`, ending at
  exactly `min_lr` for `n >= N`. With no decay (`decay_tokens` 0 or null) the power law runs
  forever (continual pretraining, early stopping).
* WSD: the same with `lr_max` in place of `lr_power` (warmup to lr_max, stable at lr_max,
  decay from lr_max).

`N_w` = `scheduler.warmup_tokens` (null: `warmup_steps * tokens_per_step`). The first step of a
warmup (n = 0) gets lr 0, as Eq. 8 prescribes.

Decay shapes `g(p)`, p in [0, 1], g(0) = 1, g(1) = 0, all monotone non-increasing:

* `linear`: `1 - p`
* `cosine`: `(1 + cos(pi * p)) / 2`
* `exponential`: `(exp(-p) - exp(-1)) / (1 - exp(-1))`, i.e. an `exp(-(n - N + N_d) / N_d)`
  curve shifted and scaled so it starts at the stable-phase lr and lands on `min_lr` exactly at
  the end of the run. This is the exponential decay of the paper authors' training code
  (IBM dolomite-engine, `optimization/scheduler.py`, `ExponentialScheduler`:
  `factor = A * exp(-x / T) + B` with `A = (1 - f) e / (e - 1)`, `B = (f e - 1) / (e - 1)`),
  written here for a decay to `min_lr`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

def run_steps(trainer: Any, steps_per_epoch: Optional[int]) -> int:
    """The optimizer steps a run takes: max_steps, or fewer when trainer.epochs ends it first."""
    if trainer.epochs is not None and steps_per_epoch:
        return max(1, min(trainer.max_steps, trainer.epochs * steps_per_epoch))
    return trainer.max_steps


# The paper's sequence length: beta (sequences per step) = tokens_per_step / PAPER_SEQ_LEN.
PAPER_SEQ_LEN = 4096
TOKEN_SCHEDULES = ("power", "wsd")

_E_INV = math.exp(-1.0)
log = logging.getLogger("granite_train.train")  # lines about the run: the trainer's name


def decay_shape(shape: str, p: float) -> float:
    """g(p): 1 at the start of the decay (p = 0), 0 at its end (p = 1); p is clamped to [0, 1]."""
    p = min(1.0, max(0.0, p))
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "exponential":
        return (math.exp(-p) - _E_INV) / (1.0 - _E_INV)
    raise ValueError(f"unknown decay shape {shape!r}")


@dataclass
class Schedule:
    # The scheduler section (granite_train.config.SchedulerConfig); not imported here, since the
    # config's validation builds a Schedule (the decay's start lr) and imports this module.
    cfg: Any
    lr: float  # lr_max: optim.lr
    total_steps: int
    tokens_per_step: Optional[int] = None  # trainer.tokens_per_step (nominal tokens per step)
    # N for the token schedules' decay; null: total_steps * tokens_per_step.
    total_tokens: Optional[int] = None
    # Derived (set in __post_init__):
    warmup_steps: int = field(init=False)  # step schedules
    warmup_tokens: int = field(init=False)  # token schedules
    decay_tokens: int = field(init=False)
    decay_start: Optional[float] = field(init=False)  # tokens; None: no decay
    beta: Optional[float] = field(init=False)

    def __post_init__(self) -> None:
        c, tps = self.cfg, self.tokens_per_step
        fraction = getattr(c, "warmup_fraction", None)
        if self.total_tokens is None and tps:
            self.total_tokens = self.total_steps * tps
        if c.warmup_tokens is not None and tps:
            self.warmup_steps = math.ceil(c.warmup_tokens / tps)
        elif fraction is not None:
            self.warmup_steps = math.ceil(fraction * self.total_steps)
        else:
            self.warmup_steps = c.warmup_steps
        if c.warmup_tokens is not None:
            self.warmup_tokens = c.warmup_tokens
        elif fraction is not None and self.total_tokens is not None:
            self.warmup_tokens = math.ceil(fraction * self.total_tokens)
        else:
            self.warmup_tokens = c.warmup_steps * (tps or 0)
        self.decay_tokens = c.decay_tokens or 0
        self.decay_start = None
        if self.decay_tokens > 0 and self.total_tokens is not None:
            self.decay_start = self.total_tokens - self.decay_tokens
        if c.batch_size is not None:
            self.beta = float(c.batch_size)
        else:
            self.beta = tps / PAPER_SEQ_LEN if tps else None
        if c.name in TOKEN_SCHEDULES and c.warmup_tokens is None and not tps and c.warmup_steps:
            raise ValueError("a token schedule with warmup_steps needs tokens_per_step (or set warmup_tokens)")

    @classmethod
    def from_config(cls, run_cfg: Any, steps_per_epoch: Optional[int] = None) -> "Schedule":
        """The schedule of a run (RunConfig): the one object the trainer and plot_lr both use.
        `steps_per_epoch` (known once the data is planned): with trainer.epochs, a run shorter
        than max_steps ends, and its step schedule decays, at epochs x steps_per_epoch."""
        t = run_cfg.trainer
        total_steps = run_steps(t, steps_per_epoch)
        if t.max_tokens is not None and run_cfg.scheduler.name not in TOKEN_SCHEDULES:
            # Step schedules end at the nominal step count of max_tokens (then hold the end value).
            total_steps = max(1, min(t.max_steps, math.ceil(t.max_tokens / t.tokens_per_step)))
        sched = cls(run_cfg.scheduler, run_cfg.optim.lr, total_steps,
                    tokens_per_step=t.tokens_per_step, total_tokens=t.max_tokens)
        if sched.decay_start is not None and sched.cfg.name in TOKEN_SCHEDULES:
            if t.max_tokens is None:
                log.info("the %s decay ends at max_steps x tokens_per_step = %d tokens; steps hold up "
                         "to tokens_per_step input tokens, so set trainer.max_tokens for an exact end",
                         sched.cfg.name, sched.total_tokens)
            elif t.max_tokens > t.max_steps * t.tokens_per_step:
                log.warning("trainer.max_steps=%d stops the run before trainer.max_tokens=%d: the lr "
                            "decay will not finish; raise trainer.max_steps", t.max_steps, t.max_tokens)
        return sched

    # -- token schedules -------------------------------------------------------------------------
    def lr_power(self, n: float) -> float:
        """Eq. 7: min(lr_max, a * beta * n**b); n <= 0 gives lr_max (the limit, b < 0)."""
        if self.beta is None:
            raise ValueError("the power schedule needs scheduler.batch_size or tokens_per_step")
        if n <= 0:
            return self.lr
        return min(self.lr, self.cfg.a * self.beta * float(n) ** self.cfg.b)

    def _stable(self, n: float) -> float:
        return self.lr_power(n) if self.cfg.name == "power" else self.lr

    def _lr_tokens(self, n: float) -> float:
        n = max(0.0, float(n))
        if self.decay_start is not None and n >= self.decay_start:
            start = max(self.decay_start, 0.0)
            p = (n - start) / self.decay_tokens
            top = self._stable(start)
            return self.cfg.min_lr + (top - self.cfg.min_lr) * decay_shape(self.cfg.decay, p)
        if self.warmup_tokens > 0 and n < self.warmup_tokens:
            return (n / self.warmup_tokens) * self._stable(self.warmup_tokens)
        return self._stable(n)

    # -- both -----------------------------------------------------------------------------------
    def lr_at(self, step: int, tokens_seen: Optional[float] = None) -> float:
        """The lr of optimizer step `step` (0-based), `tokens_seen` input tokens trained before it."""
        if self.cfg.name in TOKEN_SCHEDULES:
            if tokens_seen is None:
                raise ValueError(f"the {self.cfg.name} schedule counts tokens: pass tokens_seen")
            return self._lr_tokens(tokens_seen)
        warmup = self.warmup_steps
        if warmup > 0 and step < warmup:
            return self.lr * (step + 1) / warmup
        if self.cfg.name == "constant":
            return self.lr
        min_lr = self.lr * self.cfg.min_lr_ratio
        span = max(1, self.total_steps - warmup - 1)
        progress = min(1.0, (step - warmup) / span)
        if self.cfg.name == "linear":
            return self.lr + (min_lr - self.lr) * progress
        return min_lr + 0.5 * (self.lr - min_lr) * (1.0 + math.cos(math.pi * progress))
