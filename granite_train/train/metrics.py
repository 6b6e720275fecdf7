"""Where step metrics go: metrics.jsonl, Weights & Biases, and the rank-0 progress bar."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict

from granite_train.config import WandbConfig
from granite_train.errors import UserError

log = logging.getLogger("granite_train.train")


class MetricsSink:
    """Rank 0 writes; other ranks hold a sink that does nothing (so call sites stay simple)."""

    def __init__(self, output_dir: Path, wandb_cfg: WandbConfig, run_config: Dict[str, Any],
                 total_steps: int, enabled: bool, progress: bool):
        self.enabled = enabled
        self._file = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self._file = open(output_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_cfg.mode != "disabled":
            self._wandb = _init_wandb(wandb_cfg, run_config, output_dir)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            # Scalars only: per-expert count tables stay in metrics.jsonl (for plots).
            scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self._wandb.log(scalars, step=record["step"])
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                  tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False)
        elif record["step"] % 10 == 0 or record["step"] == 1:
            log.info("step %d loss %.4f lr %.2e tokens/s %.0f", record["step"], record["loss"],
                     record["lr"], record["tokens_per_sec"])

    def summary(self, values: Dict[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in values.items():
                self._wandb.summary[k] = v

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _init_wandb(cfg: WandbConfig, run_config: Dict[str, Any], output_dir: Path):
    import wandb  # imported only when used: it is slow to import

    try:
        return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, tags=cfg.tags,
                          mode=cfg.mode, config=run_config, dir=str(output_dir))
    except Exception as exc:  # wandb raises UsageError/CommError without an API key or network
        raise UserError(
            f"W&B init failed in mode {cfg.mode!r}: {' '.join(str(exc).split())[:200]}; "
            f"run `wandb login`, or set tracking.wandb.mode=offline or disabled") from None
