"""Where step metrics go: metrics.jsonl, Weights & Biases, and the rank-0 progress bar."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, Optional

from granite_train.config import WandbConfig
from granite_train.errors import UserError

log = logging.getLogger("granite_train.train")


class MetricsSink:
    """Rank 0 writes; other ranks hold a sink that does nothing (so call sites stay simple)."""

    def __init__(self, output_dir: Path, wandb_cfg: WandbConfig, run_config: Dict[str, Any],
                 total_steps: int, enabled: bool, progress: bool, initial_step: int = 0,
                 wandb_run_id: Optional[str] = None):
        """`initial_step` and `wandb_run_id` continue a resumed run's bar and W&B run."""
        self.enabled = enabled
        self.wandb_run_id: Optional[str] = None
        self._file = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self._file = open(output_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_cfg.mode != "disabled":
            self._wandb = _init_wandb(wandb_cfg, run_config, output_dir, wandb_run_id)
            self.wandb_run_id = self._wandb.id
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                             dynamic_ncols=True)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        # Strict JSON: a non-finite number becomes null.
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            # Scalars only: per-expert count tables stay in metrics.jsonl (for plots).
            scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self._wandb.log(scalars, step=record["step"])
        if record.get("split") == "eval":
            log.info("eval at step %d: loss %s, perplexity %s (%d tokens)", record["step"],
                     record["eval_loss"], record["eval_ppl"], record["eval_tokens"])
            return
        if record.get("skipped"):
            log.warning("step %d skipped: non-finite loss or grad norm (%d skipped so far)",
                        record["step"], record["skipped_steps"])
        if self._bar is not None:
            self._bar.update(record["step"] - self._bar.n)
            if not record.get("skipped"):
                self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                      tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False)
        elif not record.get("skipped") and (record["step"] % 10 == 0 or record["step"] == 1):
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


def _init_wandb(cfg: WandbConfig, run_config: Dict[str, Any], output_dir: Path, run_id: Optional[str]):
    import wandb  # imported only when used: it is slow to import

    try:
        # A resumed run continues its W&B run (same id) instead of starting a second curve.
        return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, tags=cfg.tags,
                          mode=cfg.mode, config=run_config, dir=str(output_dir),
                          id=run_id, resume="allow" if run_id else None)
    except Exception as exc:  # wandb raises UsageError/CommError without an API key or network
        raise UserError(
            f"W&B init failed in mode {cfg.mode!r}: {' '.join(str(exc).split())[:200]}; "
            f"run `wandb login`, or set tracking.wandb.mode=offline or disabled") from None


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the records of steps <= last_step (a resumed run rewrites what came after its
    checkpoint); returns how many records were dropped. Written atomically."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut by a kill: drop it
            dropped += 1
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return dropped
