"""usage: python -m granite_train.plot_lr [overrides] [--out PNG] [--csv CSV] [--every K]

Evaluates the configured learning-rate schedule over the whole run with the trainer's own
object (`Schedule.from_config`, the same `lr_at(step, tokens_seen)` the loop calls) and writes

* a CSV with one row per optimizer step: `step` (1-based, as in metrics.jsonl), `tokens` (input
  tokens trained before that step: the n the lr is evaluated at) and `lr` (the lr of that step);
* a PNG (matplotlib): lr against tokens, with optimizer steps on the top axis.

`--csv` alone writes only the CSV (no matplotlib needed); `--out` writes the PNG; with neither,
the PNG goes to lr.png. It prints the files it wrote.

The run is taken as every step training exactly `trainer.tokens_per_step` input tokens (real
steps hold up to that many; metrics.jsonl has the exact tokens_seen) for `trainer.max_steps`
steps, or until `trainer.max_tokens`. `--every K` keeps every K-th step (and the last one); by
default K keeps at most 100,000 rows.

Examples:
  python -m granite_train.plot_lr scheduler=power trainer.max_tokens=2000000000 \\
      scheduler.warmup_tokens=100000000 scheduler.decay_tokens=200000000 --out lr.png --csv lr.csv
  python -m granite_train.plot_lr recipe=sft_tiny --csv lr.csv
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from granite_train.cli import compose_config, split_options
from granite_train.errors import UserError
from granite_train.schedule import TOKEN_SCHEDULES, Schedule

MAX_ROWS = 100_000
PLOT_EXTRA = "pip install 'granite-train[plot]'"
DEFAULT_PNG = "lr.png"  # written when neither --out nor --csv is given


def _parse(args: Sequence[str]) -> Tuple[List[str], dict]:
    overrides, opts = split_options(args, {"out": None, "csv": None, "every": None},
                                    "plot_lr takes --out PNG, --csv CSV, --every K and config overrides")
    for name in ("out", "csv"):
        if opts[name] == "":
            raise UserError(f"--{name} needs a file name (see --help)")
    if opts["every"] is not None:
        try:
            opts["every"] = int(opts["every"])
        except ValueError:
            opts["every"] = 0
        if opts["every"] < 1:
            raise UserError(f"--every={opts['every']} must be a whole number >= 1")
    return overrides, opts


def run_steps(cfg) -> int:
    """Optimizer steps of the run: max_steps, or fewer when max_tokens comes first."""
    t = cfg.trainer
    if t.max_tokens is None:
        return t.max_steps
    return max(1, min(t.max_steps, math.ceil(t.max_tokens / t.tokens_per_step)))


def lr_table(cfg, every: Optional[int] = None) -> List[Tuple[int, int, float]]:
    """(step, tokens before the step, lr) for the run, from the trainer's schedule."""
    schedule = Schedule.from_config(cfg)
    steps = run_steps(cfg)
    every = every or max(1, math.ceil(steps / MAX_ROWS))
    tps = cfg.trainer.tokens_per_step
    ks = list(range(0, steps, every))
    if ks[-1] != steps - 1:
        ks.append(steps - 1)
    return [(k + 1, k * tps, schedule.lr_at(k, k * tps)) for k in ks]


def _plot(rows, cfg, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tps = cfg.trainer.tokens_per_step
    schedule = Schedule.from_config(cfg)
    s = cfg.scheduler
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r[1] for r in rows], [r[2] for r in rows], lw=1.5)
    if s.name in TOKEN_SCHEDULES:
        if schedule.warmup_tokens > 0:
            ax.axvline(schedule.warmup_tokens, ls=":", c="grey", lw=1)
        if schedule.decay_start is not None:
            ax.axvline(schedule.decay_start, ls=":", c="grey", lw=1)
    title = f"scheduler={s.name}, optim.lr={cfg.optim.lr:g}"
    if s.name == "power":
        title += f", a={s.a:g}, b={s.b:g}, beta={schedule.beta:g}"
    if s.name in TOKEN_SCHEDULES and schedule.decay_start is not None:
        title += f", {s.decay} decay over {schedule.decay_tokens:,} tokens to {s.min_lr:g}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("input tokens trained before the step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    top = ax.secondary_xaxis("top", functions=(lambda x: x / tps, lambda x: x * tps))
    top.set_xlabel(f"optimizer step (x {tps:,} tokens)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    try:
        overrides, opts = _parse(args)
        # The PNG when asked for (--out), or by default when no CSV was asked for either.
        png = Path(opts["out"]) if opts["out"] else None if opts["csv"] else Path(DEFAULT_PNG)
        if png is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise UserError(f"plot_lr draws with matplotlib, which is not installed: {PLOT_EXTRA} "
                                f"(or write only the CSV with --csv FILE)") from None
        cfg = compose_config(overrides)
        rows = lr_table(cfg, opts["every"])
    except UserError as exc:
        print(f"granite-train: error: {exc}", file=sys.stderr)
        return 2
    written = []
    if opts["csv"]:
        csv_path = Path(opts["csv"])
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "tokens", "lr"])
            w.writerows((step, tokens, repr(lr)) for step, tokens, lr in rows)
        written.append(str(csv_path))
    if png is not None:
        _plot(rows, cfg, png)
        written.append(str(png))
    peak = max(rows, key=lambda r: r[2])
    print(f"{rows[-1][0]} steps ({len(rows)} rows), peak lr {peak[2]:.4g} at step {peak[0]}, "
          f"last lr {rows[-1][2]:.4g} | wrote {' and '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
