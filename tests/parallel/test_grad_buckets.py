"""Bucketed, overlapped gradient reduction of the plain engine (parallel/grad_buckets.py): the
same sums as one flat all-reduce after the backward, bit for bit, on 2 gloo ranks; buckets
launched during the backward; ranks whose last backward misses parameters, or that train
nothing, still issue the same collectives in the same order; a non-finite step is skipped on
every rank."""

from typing import List

import pytest
import torch
import torch.distributed as dist
from torch import nn

from granite_train.config import RunConfig, validate
from granite_train.errors import UserError
from granite_train.parallel.engine import PlainEngine
from granite_train.parallel.env import Env
from granite_train.parallel.grad_buckets import GradBuckets, _chunks
from granite_train.parallel.plan import ParallelPlan

from ..gloo_ranks import run_on_ranks


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.side = nn.Linear(8, 4)  # used only where `use_side`

    def forward(self, x: torch.Tensor, use_side: bool) -> torch.Tensor:
        y = self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))
        return (y + self.side(x) if use_side else y).square().mean()


def _engine(model: nn.Module, rank: int, size: int, bucket_mb: float) -> PlainEngine:
    env = Env(rank, size, 0, torch.device("cpu"), None)
    plan = ParallelPlan(world_size=size, zero_stage=None, expert=None, matmul_params=0)
    return PlainEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), env, 1e9, plan, bucket_mb)


# Per step, per rank: each micro-batch uses `side` (True), does not (False) or trains nothing
# (None). Step 0: both ranks use everything. Step 1: rank 1's last backward misses `side` (its
# bucket, the first to be reduced, waits for step(); rank 0 launches all in its backward). Step
# 2: rank 1 trains nothing.
PLAN = [
    {0: [True, True], 1: [True, True]},
    {0: [True, True], 1: [True, False]},
    {0: [True, False], 1: [None, None]},
]


def _flat_reference(model: nn.Module, rank: int, step: int) -> List[torch.Tensor]:
    """The gradients of `step` as the engine reduced them before buckets: autograd's own,
    zero-filled, one flat SUM all-reduce after the backward."""
    for i, use in enumerate(PLAN[step][rank]):
        if use is not None:
            model(_data(rank, step, i), use).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    model.zero_grad(set_to_none=True)
    return [t.view_as(g).clone() for t, g in zip(flat.split([g.numel() for g in grads]), grads)]


def _data(rank: int, step: int, i: int) -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(100 * step + 10 * rank + i))


def _cases(rank: int, size: int, failures: List[str]) -> None:
    torch.manual_seed(0)
    model, reference = Net(), Net()
    reference.load_state_dict(model.state_dict())
    reference_sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    engine = _engine(model, rank, size, bucket_mb=0.0005)  # ~524 bytes: a bucket per 1-2 tensors
    n_buckets = len(engine.buckets.buckets)
    if n_buckets < 4:
        failures.append(f"rank {rank}: {n_buckets} buckets, the test wants several")
    reduced: List[torch.Tensor] = []
    finish = engine.buckets.finish

    def finish_and_keep() -> None:  # the reduced gradients, as step() sees them before the update
        finish()
        reduced[:] = [p.grad.clone() for p in model.parameters()]

    engine.buckets.finish = finish_and_keep
    for step in range(len(PLAN)):
        expected = _flat_reference(reference, rank, step)
        micro = PLAN[step][rank]
        last = max((i for i, use in enumerate(micro) if use is not None), default=-1)
        for i, use in enumerate(micro):
            if use is None:
                engine.backward_nothing()
            else:
                engine.backward(model(_data(rank, step, i), use), last=i == last)
        engine.backwards_done()
        # Another collective of the step, as train_step reduces its loss sums: after the buckets.
        dist.all_reduce(torch.ones(3))
        norm, stepped = engine.step(True)
        for (name, _), g, e in zip(model.named_parameters(), reduced, expected):
            if not torch.equal(g, e):
                failures.append(f"rank {rank} step {step}: {name} differs from the flat reduction by "
                                f"{(g - e).abs().max():.3g}")
        overlapped = engine.buckets.overlapped
        # Step 2: rank 0's last backward misses `side` too (its first micro-batch used it).
        want = [(n_buckets, n_buckets), (n_buckets, 0), (0, 0)][step][rank]
        if overlapped != want:
            failures.append(f"rank {rank} step {step}: {overlapped} of {n_buckets} buckets launched during "
                            f"the backward, expected {want}")
        # The update: the same on both ranks (SGD on the same reduced gradients), then zeroed buckets.
        if not stepped:
            failures.append(f"rank {rank} step {step}: not stepped (norm {norm})")
        if any(b.buffer.abs().sum() != 0 for b in engine.buckets.buckets):
            failures.append(f"rank {rank} step {step}: buckets not zeroed after the step")
        for p, e in zip(reference.parameters(), expected):
            p.grad = e
        reference_sgd.step()
        reference.zero_grad(set_to_none=True)
        for (name, p), r in zip(model.named_parameters(), reference.parameters()):
            if not torch.equal(p, r):
                failures.append(f"rank {rank} step {step}: weight {name} differs after the update")
    # A non-finite gradient on one rank: every rank skips the update.
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(_data(rank, 9, 0), True) * (float("inf") if rank == 1 else 1.0)
    engine.backward(loss, last=True)
    norm, stepped = engine.step(True)
    if stepped or not all(torch.equal(p, b) for p, b in zip(model.parameters(), before)):
        failures.append(f"rank {rank}: a non-finite step was applied (norm {norm}, stepped {stepped})")
    # After the last checkpoint the buckets go, and no step may follow.
    engine.release_optimizer_state()
    if any(p.grad is not None for p in model.parameters()):
        failures.append(f"rank {rank}: gradients kept after release")
    try:
        engine.backward(model(_data(rank, 0, 0), True), last=True)
        failures.append(f"rank {rank}: a backward after release was accepted")
    except RuntimeError:
        pass


def test_buckets_reduce_like_one_flat_all_reduce_on_two_ranks(tmp_path):
    assert run_on_ranks(tmp_path, 2, _cases) == []


def test_one_process_keeps_autograds_gradients():
    model = Net()
    engine = _engine(model, 0, 1, bucket_mb=25.0)
    assert engine.buckets is None
    engine.backward(model(torch.randn(3, 8), False))
    assert model.side.weight.grad is None  # nothing allocated for what the step did not reach
    assert engine.step(True)[1]
    assert all(p.grad is None for p in model.parameters())  # freed between steps


def test_chunks_split_by_size_and_dtype():
    params = [nn.Parameter(torch.zeros(n, dtype=d)) for n, d in
              [(10, torch.float32), (10, torch.float32), (30, torch.float32), (4, torch.bfloat16), (4, torch.float32)]]
    sizes = [[p.numel() for p in chunk] for chunk in _chunks(params, 80)]
    assert sizes == [[10, 10], [30], [4], [4]]  # 30 floats exceed 80 bytes: a bucket of its own
    assert [[p.numel() for p in c] for c in _chunks(params, 0)] == [[10, 10, 30], [4], [4]]


def test_a_gradient_accumulated_twice_in_the_armed_backward_is_refused():
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    buckets = GradBuckets([p, q], 1 << 20)  # one bucket: incomplete until q arrives
    buckets.arm()
    buckets._arrived(p)
    with pytest.raises(RuntimeError, match="accumulated twice"):
        buckets._arrived(p)


def test_bucket_mb_must_not_be_negative():
    cfg = RunConfig()
    cfg.distributed.bucket_mb = -1.0
    with pytest.raises(UserError, match="distributed.bucket_mb=-1.0 must be >= 0"):
        validate(cfg)


def test_bucket_mb_0_reduces_nothing_during_the_backward():
    model = Net()
    buckets = GradBuckets(list(model.parameters()), 0)
    buckets.arm()
    model(torch.randn(3, 8), True).backward()
    assert len(buckets.buckets) == 1 and buckets._next == 0  # launched only by launch_rest / finish
    buffer = buckets.buckets[0].buffer  # reverse parameter order: a.weight is the last view
    assert model.a.weight.grad.data_ptr() == buffer.data_ptr() + 4 * (buffer.numel() - model.a.weight.numel())
