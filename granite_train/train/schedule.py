"""Learning-rate schedules as pure functions of the step.

`lr_at(step)` is the lr the optimizer uses for optimizer step `step` (0-based); the trainer sets
it before each step, so what metrics.jsonl reports is what was applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from granite_train.config import SchedulerConfig


@dataclass
class Schedule:
    cfg: SchedulerConfig
    lr: float
    total_steps: int

    def lr_at(self, step: int) -> float:
        warmup = self.cfg.warmup_steps
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
