import math

import pytest

from granite_train.config import SchedulerConfig
from granite_train.train.schedule import Schedule


def test_warmup_is_linear_and_reaches_peak():
    s = Schedule(SchedulerConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1), lr=1.0, total_steps=20)
    assert [s.lr_at(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_ends_at_min_lr_and_is_monotone_after_warmup():
    s = Schedule(SchedulerConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1), lr=2.0, total_steps=12)
    lrs = [s.lr_at(i) for i in range(12)]
    assert lrs[-1] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    mid = 2 + (12 - 2 - 1) / 2
    assert s.lr_at(int(mid)) == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi * (int(mid) - 2) / 9)), rel=1e-9)


def test_linear_and_constant():
    lin = Schedule(SchedulerConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0), lr=1.0, total_steps=11)
    assert [lin.lr_at(i) for i in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    const = Schedule(SchedulerConfig(name="constant", warmup_steps=0), lr=3e-4, total_steps=5)
    assert {const.lr_at(i) for i in range(5)} == {3e-4}
