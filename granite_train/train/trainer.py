"""The trainer: build -> parallelize -> fit.

`Trainer(cfg)` builds everything a run needs, in the order the data flows: the run directory
(locked for this run), the checkpoint to resume, the whole model (`build.py`), the model cut over
the ranks (`parallel.parallelize`), the data, the schedule and the metrics sink. `fit()` trains
to `trainer.max_steps` / `trainer.max_tokens` / the end of the data, evaluating and
checkpointing on the way, and exports the final weights in HF layout. One optimizer step is
`train.step.train_step`.

A step whose loss or gradient norm is not finite is skipped (no optimizer update, counted in
metrics.jsonl); `trainer.max_bad_steps` of them in a row stop the run. Checkpoints (`state.py`)
hold everything a resumed run needs to continue exactly where the saved one was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional

import datasets
import torch.distributed as dist
from omegaconf import OmegaConf

from granite_train.config import RunConfig, validate_model_path
from granite_train.data import build_eval_data, build_train_data, load_tokenizer
from granite_train.errors import Preempted, UserError
from granite_train.models.hf_io import save_pieces
from granite_train.parallel.env import agree, gather_ints, init_env, main_rank_first
from granite_train.parallel.parallelize import parallelize
from granite_train.models.model import full_size
from granite_train.schedule import Schedule, run_steps
from granite_train.train.adapter import AdapterState, AdapterSummary, adapt_model, save_adapter_dir, trainable_keys
from granite_train.train.build import build_run_model, describe, loads_sharded
from granite_train.train import final_export
from granite_train.train.evaluate import evaluate
from granite_train.train.memory import MemoryMeter, log_weights_loaded
from granite_train.train.metrics import MetricsSink, peak_tflops, step_flops, step_record, truncate_metrics
from granite_train.train.preemption import PreemptionWatch
from granite_train.train.rng import seed_everything
from granite_train.train.run_lock import RunLock
from granite_train.train.run_log import FILE_ONLY, RunLog
from granite_train.train.state import (Checkpointer, Counters, DataState, EngineState, ModelState, RngState,
                                       RunConfigState)
from granite_train.train.step import StepOutcome, StepSettings, set_lr, train_step

log = logging.getLogger("granite_train.train")


@dataclasses.dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    final_loss: float
    output_dir: Path


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        if cfg.model.path is not None:
            validate_model_path(cfg.model.path)  # before the run directory is made
        self.cfg, self.env = cfg, init_env(cfg.trainer, cfg.distributed)
        self.out = Path(cfg.trainer.output_dir)
        self.sink: Optional[MetricsSink] = None
        self.preemption: Optional[PreemptionWatch] = None
        self.run_log: Optional[RunLog] = None
        self._lock = self._lock_output_dir()
        self.run_log = RunLog(self.out, enabled=self.env.is_main)
        if not self.env.is_main:
            datasets.disable_progress_bars()  # rank 0's bars are the run's
        try:
            self._build()
        except BaseException as exc:
            self._close(exc)
            raise

    # ---------------------------------------------------------------- build

    def _lock_output_dir(self) -> Optional[RunLock]:
        """Rank 0 holds the run directory; every rank learns whether it could."""
        lock, failure = (RunLock(self.out) if self.env.is_main else None), None
        if lock is not None:
            try:
                lock.acquire()
            except UserError as exc:
                lock, failure = None, str(exc)
        failure = agree(self.env, failure)
        if failure:
            raise UserError(failure)
        return lock

    def _build(self) -> None:
        cfg, env = self.cfg, self.env
        self.preemption = PreemptionWatch(cfg.trainer.preemption_signals)  # a signal during the build waits for step 1
        node = OmegaConf.structured(cfg)
        resolved: Dict[str, Any] = OmegaConf.to_container(node, resolve=True)
        config_yaml, allow = OmegaConf.to_yaml(node), list(cfg.trainer.resume_allow_changes)
        self.checkpointer = ck = Checkpointer(self.out, env, cfg.trainer.keep_checkpoints)
        self.resume = resume = ck.find(cfg.trainer.resume)
        self.counters = Counters()
        config_state = RunConfigState(config_yaml, resolved, allow, env)
        ck.add("config", config_state)
        ck.add("counters", self.counters)
        ck.restore(resume, "config", "counters")
        if env.is_main:
            self._prepare_output_dir(config_yaml)
        seed_everything(cfg.trainer.seed)

        self.tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.path)
        model = build_run_model(cfg, self.tokenizer, env)
        self.adapter: Optional[AdapterSummary] = None
        # What an adapter names as its base (absolute: export --merge may run from elsewhere).
        self.base_model = str(Path(cfg.model.path).expanduser().resolve()) if cfg.model.path else None
        if cfg.adapter.name != "none":  # adapters on the whole model; the checkpoints hold them, not the base
            self.adapter = adapt_model(model, cfg, env)
            model_state: Any = AdapterState(model, self.adapter, self.tokenizer, self.base_model, env)
        else:
            model_state = ModelState(model, self.tokenizer, allow, env, sharded=loads_sharded(cfg))
        ck.add("model", model_state)
        ck.restore(resume, "model")  # into the whole model, before it is cut over ranks
        log_weights_loaded(env)  # before the optimizer and its state exist
        if env.is_main:
            describe(cfg, model, self.tokenizer, env, resumed_from=resume)
            if self.adapter is not None:
                log.info(self.adapter.line(full_size(model.config)[0]))
        self.engine = parallelize(model, cfg, env)
        # model/ of a checkpoint: under expert parallelism without the experts (the ranks write
        # their own slices) unless a consolidated copy is asked for; an adapter run's state
        # selects its adapters from the whole model.
        consolidated = self.adapter is not None or cfg.trainer.checkpoint_hf_weights == "always"
        model_state.full_pieces = self.engine.full_pieces if consolidated else self.engine.checkpoint_pieces
        if self.adapter is None:
            model_state.shard_size = self.engine.export_shard_size
            model_state.hf_weights = not self.engine.state_holds_weights or cfg.trainer.checkpoint_hf_weights == "always"
        context = self.engine.plan.context
        # Context parallelism: the data is planned for one rank per group, in rows of the group's tokens.
        rows_cfg, data_rank, data_world = cfg.trainer, env.rank, env.world_size
        if context is not None:
            rows_cfg = dataclasses.replace(cfg.trainer, micro_batch_tokens=context.row_tokens)
            data_rank, data_world = context.data_rank, context.data_world
        with main_rank_first(env):  # tokenize once; the other ranks read the datasets cache
            self.data = build_train_data(cfg.data, rows_cfg, self.tokenizer, data_rank, data_world,
                                         gather=gather_ints(env) if env.distributed else None)
            self.eval_data = build_eval_data(cfg.data, rows_cfg, self.tokenizer, data_rank, data_world,
                                             train_data=self.data)
        ck.add("engine", EngineState(self.engine, env))
        ck.add("data", DataState(self.data, restart_for=lambda: config_state.allowed_data_changes))
        ck.add("rng", RngState(env))
        ck.restore(resume, "engine", "data", "rng")
        if resume is not None and env.is_main:
            log.info("resuming from %s: step %d, %d tokens seen", resume, self.counters.step, self.counters.tokens_seen)

        self.schedule = Schedule.from_config(cfg, self.data.num_steps_per_epoch)
        planned = run_steps(cfg.trainer, self.data.num_steps_per_epoch)
        if env.is_main and planned < cfg.trainer.max_steps:
            log.info("the run is %d steps: trainer.epochs=%d x %d steps per epoch (fewer than trainer.max_steps=%d)",
                     planned, cfg.trainer.epochs, self.data.num_steps_per_epoch, cfg.trainer.max_steps)
        self.sink = MetricsSink(self.out, cfg.tracking.wandb, resolved, planned, enabled=env.is_main,
                                progress=cfg.trainer.progress, initial_step=self.counters.step,
                                wandb_run_id=self.counters.wandb_run_id)
        self.counters.wandb_run_id = self.sink.wandb_run_id or self.counters.wandb_run_id
        self.memory = MemoryMeter(env)
        self.step_settings = StepSettings.of(model, env, cfg.model.loss_chunk_tokens, context)
        self.peak_tflops = peak_tflops(cfg.trainer.peak_tflops, env.device)
        self._last_eval = -1

    def _prepare_output_dir(self, config_yaml: str) -> None:
        """Rank 0: the resumed run's metrics cut back to its checkpoint, a fresh run's old ones
        moved aside (a fresh run must not append to an old run's curve), the config."""
        metrics = self.out / "metrics.jsonl"
        if self.resume is not None:
            dropped = truncate_metrics(metrics, self.counters.step)
            if dropped:
                log.info("metrics.jsonl: dropped %d records written after %s", dropped, self.resume.name)
        elif metrics.exists():
            metrics.rename(self.out / f"metrics.{int(time.time())}.jsonl.old")
        (self.out / "config.yaml").write_text(config_yaml)

    # ---------------------------------------------------------------- fit

    @property
    def last_loss(self) -> float:
        return self.counters.last_loss if self.counters.last_loss is not None else float("nan")

    def fit(self) -> TrainResult:
        """Train, evaluate and checkpoint to the end of the run, then export `final/`."""
        try:
            remaining = 0 if self._out_of_tokens() else max(0, self.cfg.trainer.max_steps - self.counters.step)
            if remaining == 0 and self.resume is not None:
                self._nothing_to_train()
            else:
                self._fit(remaining)
        except BaseException as exc:
            self._close(exc)
            raise
        self._close()
        if self.env.distributed:
            dist.barrier()
            dist.destroy_process_group()
        return TrainResult(self.counters.step, self.counters.tokens_seen, self.last_loss, self.out)

    def _fit(self, remaining: int) -> None:
        c, tr = self.counters, self.cfg.trainer
        start_step = c.step
        self._saved_at = c.step if self.resume is not None else -1
        self.engine.model.train()
        # islice, not a break: drawing one step too many would move the data position past it.
        # closing: steps made ahead stop at once (not during the final eval, save and export).
        with contextlib.closing(self.data.steps()) as steps:
            for step in itertools.islice(steps, remaining):
                self._train_one(step)
                self._stop_after_bad_steps()
                if tr.eval_every and c.step % tr.eval_every == 0:
                    self._evaluate()
                if tr.save_every and c.step % tr.save_every == 0 and c.bad_steps_in_a_row == 0:
                    self._save()
                signal_name = self.preemption.requested(self.env)  # every rank: they stop together
                if signal_name is not None:
                    self._stop_for(signal_name)
                if self._out_of_tokens():
                    break  # trainer.max_tokens reached
        self.sink.end_progress()
        self._end_of_data(start_step)
        self._evaluate()
        if self._saved_at != c.step and c.bad_steps_in_a_row == 0:
            self._save()
        self.sink.summary({"final_loss": self.last_loss, "tokens_seen": c.tokens_seen,
                           "skipped_steps": c.skipped_steps})
        self.sink.close()
        self._export_final()

    def _nothing_to_train(self) -> None:
        """Relaunched after the end: say so; export `final/` only if it is missing."""
        c, tr = self.counters, self.cfg.trainer
        reached = (f"trainer.max_tokens={tr.max_tokens} reached ({c.tokens_seen} tokens)" if self._out_of_tokens()
                   else f"step {c.step} already reached (trainer.max_steps={tr.max_steps})")
        if self.env.is_main:
            log.info("nothing to train: %s by %s; raise trainer.max_steps (or trainer.max_tokens) to train "
                     "further, or set a new trainer.output_dir for a new run", reached, self.resume)
        self.sink.close()
        if not final_export.is_complete(self.out / "final"):
            self._export_final()  # a kill during the export left none (or an older run's, without a marker)

    def _train_one(self, step: Any) -> StepOutcome:
        c, tr = self.counters, self.cfg.trainer
        t0 = time.perf_counter()
        lr = self.schedule.lr_at(c.step, c.tokens_seen)  # tokens trained before this step
        set_lr(self.engine, lr)
        self.memory.start_step()
        outcome = train_step(self.engine, step, self.step_settings)
        seconds = time.perf_counter() - t0
        memory = self.memory.record()  # every rank: the maxima are all-reduced
        # MFU of this rank (ranks run equal shares); absent where no peak is known (CPU).
        mfu = (step_flops(self.engine.model, step, self.engine.plan.matmul_params) / seconds
               / (self.peak_tflops * 1e12) if self.peak_tflops else None)
        c.step += 1
        c.tokens_seen += step.num_input_tokens
        if outcome.finite:
            c.bad_steps_in_a_row = 0
            c.last_loss = outcome.loss
        else:
            c.skipped_steps += 1
            c.bad_steps_in_a_row += 1
        if not outcome.finite or c.step % tr.log_every == 0 or c.step == tr.max_steps or self._out_of_tokens():
            self.sink.log(step_record(step, outcome, step_no=c.step, lr=lr, tokens_seen=c.tokens_seen,
                                      seconds=seconds, skipped_steps=c.skipped_steps, mfu=mfu) | memory)
        return outcome

    def _out_of_tokens(self) -> bool:
        max_tokens = self.cfg.trainer.max_tokens
        return max_tokens is not None and self.counters.tokens_seen >= max_tokens

    def _stop_after_bad_steps(self) -> None:
        c, limit = self.counters, self.cfg.trainer.max_bad_steps
        if c.bad_steps_in_a_row >= max(1, limit):
            raise UserError(
                f"{c.bad_steps_in_a_row} steps in a row had a non-finite loss or grad norm (up to step "
                f"{c.step}; trainer.max_bad_steps={limit}); last good checkpoint: "
                f"{self.checkpointer.latest() or 'none'}; lower optim.lr, lower optim.grad_clip or use "
                f"trainer.dtype=fp32, then resume")

    def _end_of_data(self, start_step: int) -> None:
        """Why the loop ended (logged), or a UserError when it trained nothing at all."""
        c = self.counters
        if c.step == 0:
            raise UserError("the data produced no optimizer step; add data or lower trainer.tokens_per_step")
        if c.step == start_step and self.resume is not None:
            log.info("nothing to train: the data of %s ended at step %d", self.resume, c.step)
        elif c.step < self.cfg.trainer.max_steps and not self._out_of_tokens():
            epochs = self.cfg.trainer.epochs
            log.info("%s after %d steps", f"trainer.epochs={epochs} done" if epochs else "data exhausted", c.step)

    def _evaluate(self) -> None:
        """Every rank calls it (the sums are all-reduced); once per step at most."""
        if self.eval_data is None or self._last_eval == self.counters.step:
            return
        result = evaluate(self.engine.model, self.eval_data, self.env, loss_chunk_tokens=self.cfg.model.loss_chunk_tokens,
                          lockstep=self.engine.plan.lockstep_forwards, context=self.engine.plan.context)
        self.sink.log({"step": self.counters.step, "split": "eval", **result})
        self._last_eval = self.counters.step

    def _stop_for(self, signal_name: str) -> None:
        """Preempted: a checkpoint of this step (weights are never changed by a skipped step, so
        it resumes exactly even after one), then `Preempted` (exit status 75 from the CLI)."""
        c = self.counters
        if self._saved_at != c.step:
            self._save()
        ckpt = self.checkpointer.root / f"step_{c.step}"
        if self.env.is_main:
            log.warning("preempted by %s after step %d: checkpoint %s; the same command resumes from it",
                        signal_name, c.step, ckpt)
        raise Preempted(signal_name, c.step, ckpt)

    def _save(self) -> None:
        self.checkpointer.save(self.counters.step)
        self._saved_at = self.counters.step

    def _export_final(self) -> None:
        final = self.out / "final"
        self.engine.release_optimizer_state()  # training is over and checkpointed
        # Every rank iterates the pieces (ZeRO-3 / expert parallelism gather); rank 0 writes,
        # into a staging directory published whole (final_export.py).
        staging = final_export.begin(self.out) if self.env.is_main else final
        if self.adapter is not None:
            spec = self.adapter.spec
            save_adapter_dir(staging, self.engine.full_pieces(trainable_keys(spec)), spec, self.engine.model,
                             self.base_model, self.env.is_main)
        else:
            save_pieces(self.engine.model.config, self.engine.full_pieces(), staging, self.engine.export_shard_size,
                        write=self.env.is_main, published_as=final)
        if self.env.is_main:
            self.tokenizer.save(staging)
            final_export.publish(staging, final, {"step": self.counters.step, "tokens_seen": self.counters.tokens_seen,
                                                  "kind": "peft_adapter" if self.adapter is not None else "hf_model"})
            what = "PEFT adapter" if self.adapter is not None else "HF checkpoint"
            log.info("done: %d steps, %d tokens, final loss %.4f | %s: %s",
                     self.counters.step, self.counters.tokens_seen, self.last_loss, what, final)

    def _close(self, error: Optional[BaseException] = None) -> None:
        """Idempotent. A UserError or preemption line also goes to train.log (the CLI prints it)."""
        if isinstance(error, (UserError, Preempted)):
            FILE_ONLY.error("%s: %s", "preempted" if isinstance(error, Preempted) else "error", error)
        if self.run_log is not None:
            self.run_log.close()
        if self.preemption is not None:
            self.preemption.close()
        if self.sink is not None:
            self.sink.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def train(cfg: RunConfig) -> TrainResult:
    return Trainer(cfg).fit()
