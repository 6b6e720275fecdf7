"""Eval loss and perplexity over the whole eval set (granite_train/data/eval.py).

Token-exact like training: eval_loss = (sum of token losses over every eval example) / (trained
eval tokens), both sums accumulated in fp64 over this rank's micro-batches and all-reduced over
data-parallel ranks, so neither trainer.micro_batch_tokens nor the world size changes it.
Every rank must call `evaluate` (it runs a collective).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from granite_train.data.collator import dummy_micro_batch, is_empty, model_inputs, to_device
from granite_train.parallel.context_parallel import forward_inputs
from granite_train.parallel.env import Env
from granite_train.parallel.plan import ContextPlan


def eval_sums(model: torch.nn.Module, eval_data, device: torch.device,
              autocast_dtype: Optional[torch.dtype] = None, loss_chunk_tokens: int = 0,
              forwards_to_run: Optional[Callable[[int], int]] = None,
              context: Optional[ContextPlan] = None) -> torch.Tensor:
    """fp64 [sum of token losses, trained tokens] over THIS rank's eval micro-batches (on
    `device`); no collective unless `forwards_to_run` has one.
    `forwards_to_run(n)`: given this rank's n forwards, how many every rank must run (the rest
    run on a dummy micro-batch and count nothing), for models whose forward is a collective
    (ZeRO-3, expert parallelism).
    The caller sets eval mode and no_grad (`evaluate` does)."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)

    def forward(inputs, labels):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return model(**inputs, labels=labels, loss_chunk_tokens=loss_chunk_tokens, return_logits=False)

    forwards = 0
    for mb in eval_data.micro_batches():
        if is_empty(mb):
            continue
        # On the host copy: no device sync. The row decides (the same on a context group's ranks).
        if int((mb["labels"] != -100).sum()) == 0:  # (the collators mask every example's first label)
            continue
        inputs, labels, n_mb = forward_inputs(mb, context)  # context parallelism: this rank's slice
        output = forward(to_device(inputs, device), labels.to(device))
        forwards += 1
        sums[0] += output.loss.detach().double() * n_mb  # the model's loss is the mean over n_mb
        sums[1] += n_mb
    if forwards_to_run is not None:
        dummy = dummy_micro_batch(device)
        for _ in range(forwards_to_run(forwards) - forwards):
            forward(model_inputs(dummy), dummy["labels"])
    return sums


def _most_forwards_of_any_rank(n: int, device: torch.device) -> int:
    box = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box)


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_data, env: Env, loss_chunk_tokens: int = 0,
             lockstep: bool = False, context: Optional[ContextPlan] = None) -> Dict[str, float]:
    """eval_loss, eval_ppl, eval_tokens, eval_examples, eval_time_s over the whole eval set (all
    ranks together). The model is in eval mode meanwhile and back in its previous mode after.
    `lockstep`: every rank runs as many forwards (ZeRO-3, expert parallelism)."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        align = (lambda n: _most_forwards_of_any_rank(n, env.device)) if (lockstep and env.distributed) else None
        sums = eval_sums(model, eval_data, env.device, env.autocast_dtype, loss_chunk_tokens, align, context)
        if env.distributed:
            dist.all_reduce(sums)
        loss_sum, tokens = float(sums[0]), int(round(float(sums[1])))
    finally:
        model.train(was_training)
    loss = loss_sum / tokens if tokens else float("nan")
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = float("inf")
    return {"eval_loss": loss, "eval_ppl": ppl, "eval_tokens": tokens,
            "eval_examples": eval_data.num_examples, "eval_time_s": time.perf_counter() - t0}
