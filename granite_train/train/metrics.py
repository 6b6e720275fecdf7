"""Step metrics: what a step's record holds, and where records go (metrics.jsonl, Weights &
Biases, the rank-0 progress bar)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from granite_train.config import WandbConfig
from granite_train.errors import UserError
from granite_train.train.run_log import FILE_ONLY

log = logging.getLogger("granite_train.train")


class MetricsSink:
    """Rank 0 writes; other ranks hold a sink that does nothing (so call sites stay simple).

    The progress bar (rank 0, `trainer.progress`, only on a terminal) appears with the first step
    record and shows the step it just finished; log lines are written above it, and `end_progress`
    closes it after the last step, so the end of the run does not redraw it. Without a bar (not a
    terminal: SLURM logs, pipes) step 1, every 10th and the last step are log lines instead;
    train.log gets those lines either way."""

    def __init__(self, output_dir: Path, wandb_cfg: WandbConfig, run_config: Dict[str, Any],
                 total_steps: int, enabled: bool, progress: bool, initial_step: int = 0,
                 wandb_run_id: Optional[str] = None):
        """`initial_step` and `wandb_run_id` continue a resumed run's bar and W&B run."""
        self.enabled = enabled
        self.wandb_run_id: Optional[str] = None
        self._file = None
        self._wandb = None
        self._bar = None
        self._redirect = contextlib.ExitStack()
        self._total, self._initial = total_steps, initial_step
        self._want_bar = progress and enabled and sys.stderr.isatty()
        if not enabled:
            return
        self._file = open(output_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_cfg.mode != "disabled":
            self._wandb = _init_wandb(wandb_cfg, run_config, output_dir, wandb_run_id)
            self.wandb_run_id = self._wandb.id

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
                     _fmt(record["eval_loss"], ".4f"), _fmt(record["eval_ppl"], ".4g"), record["eval_tokens"])
            return
        if record.get("skipped"):
            log.warning("step %d skipped: non-finite loss or grad norm (%d skipped so far)",
                        record["step"], record["skipped_steps"])
            return
        step = record["step"]
        if step % 10 == 0 or step == 1 or step == self._total:
            # With a bar on the console, the line goes to train.log only.
            (FILE_ONLY if self._start_bar() else log).info(
                "step %d/%d loss %.4f lr %.2e tokens/s %.0f", step, self._total, record["loss"], record["lr"],
                record["tokens_per_sec"])
        if self._start_bar():
            # Postfix first, then the move: the redraw shows this step's numbers.
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                  tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False)
            self._bar.update(step - self._bar.n)

    def _start_bar(self) -> bool:
        if self._bar is None and self._want_bar:
            self._bar = tqdm(total=self._total, initial=self._initial, desc="train", unit="step",
                             dynamic_ncols=True)
            self._redirect.enter_context(logging_redirect_tqdm())  # log lines above the bar, not glued to it
        return self._bar is not None

    def end_progress(self) -> None:
        """After the last step: the bar's final state stays on screen, once."""
        self._want_bar = False
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()

    def summary(self, values: Dict[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in values.items():
                self._wandb.summary[k] = v

    def close(self) -> None:
        """Idempotent: the trainer closes the sink before its export and again on any error."""
        self.end_progress()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        self.enabled = False


def _fmt(value: Optional[float], spec: str) -> str:
    return "nan" if value is None else format(value, spec)


def _init_wandb(cfg: WandbConfig, run_config: Dict[str, Any], output_dir: Path, run_id: Optional[str]):
    import wandb  # only when tracking is on: its import costs seconds and starts no service otherwise

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


# ---------------------------------------------------------------- what a step record holds

# Dense bf16 peak TFLOP/s by GPU name (vendor spec sheets; fp32 runs use TF32 peaks / 2 would be
# closer, but training here is bf16). Substring match on torch.cuda.get_device_name().
# The first matching key wins: the more specific names first.
_PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0),
                     ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0))


def peak_tflops(configured: Optional[float], device: torch.device) -> Optional[float]:
    """The per-device peak used for MFU: the configured value, a known GPU's, or None."""
    if configured is not None:
        return configured if configured > 0 else None
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in _PEAK_BF16_TFLOPS if key in name), None)


def step_flops(model: torch.nn.Module, step: Any, matmul_params: Optional[int] = None) -> float:
    """Model FLOPs of this rank's share of the step (forward + backward, PaLM convention):
    tokens x flops_per_token at the token-weighted mean example length, since attention and the
    SSD scan never cross examples. `matmul_params`: the full model's, counted before sharding."""
    lens: List[int] = []
    for mb in step.micro_batches:
        cu = mb.get("cu_seq_lens")
        if cu is not None:
            bounds = cu.reshape(-1).tolist()
            lens += [e - s for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        elif "attention_mask" in mb:
            lens += [int(n) for n in mb["attention_mask"].sum(dim=1).tolist() if n > 0]
    if not lens:
        return 0.0
    tokens = sum(lens)
    return tokens * model.flops_per_token(max(1, round(sum(n * n for n in lens) / tokens)), matmul_params)


def expert_load(counts_LE: torch.Tensor) -> Dict[str, Any]:
    """Load balance of the step, worst layer: the busiest expert's tokens over the mean (1.0 is
    perfect balance) and over the idlest expert's (inf, logged null, when an expert got none),
    how many (layer, expert) pairs got no token, plus the per-layer counts for plots."""
    counts_LE = counts_LE.float()
    max_L = counts_LE.max(dim=1).values
    imbalance_L = max_L / counts_LE.mean(dim=1).clamp_min(1e-9)
    min_L = counts_LE.min(dim=1).values
    max_min = float("inf") if bool((min_L == 0).any()) else float((max_L / min_L).max())
    return {"expert_imbalance": float(imbalance_L.max()), "expert_max_min": max_min,
            "experts_idle": int((counts_LE == 0).sum()),
            "expert_counts": counts_LE.round().long().tolist()}


def step_record(step: Any, outcome: Any, *, step_no: int, lr: float, tokens_seen: int, seconds: float,
                skipped_steps: int, mfu: Optional[float]) -> Dict[str, Any]:
    """The metrics.jsonl record of one optimizer step (`outcome`: its `train.step.StepOutcome`)."""
    finite = outcome.finite
    return {
        "step": step_no,
        "epoch": step.epoch,
        "loss": outcome.loss if finite else None,
        "lr": lr,
        "grad_norm": outcome.grad_norm if math.isfinite(outcome.grad_norm) else None,
        "tokens": step.num_trained_tokens,
        "input_tokens": step.num_input_tokens,
        "tokens_seen": tokens_seen,
        "tokens_per_sec": step.num_input_tokens / seconds,
        "packing_efficiency": step.num_input_tokens / max(step.num_slots, 1),
        "micro_batches": len(step.micro_batches),
        "step_time_s": seconds,
        **({"mfu": mfu} if mfu is not None else {}),
        **({"skipped": True} if not finite else {}),
        "skipped_steps": skipped_steps,
        **({"aux_loss": outcome.aux_loss} if outcome.aux_loss is not None else {}),
        **(expert_load(outcome.expert_counts) if outcome.expert_counts is not None else {}),
        **source_mix(step),
    }


def source_mix(step: Any) -> Dict[str, Any]:
    """data.sources: each source's input tokens in this step and through it (flat keys, so W&B
    groups them as panels)."""
    mix: Dict[str, Any] = {}
    for name, n in getattr(step, "source_tokens", {}).items():
        mix[f"source_tokens/{name}"] = n
        mix[f"source_tokens_seen/{name}"] = step.source_tokens_seen[name]
    return mix
