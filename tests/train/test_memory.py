"""The memory numbers metrics.jsonl reports: a per-step host peak that resets, and maxima over
ranks (the 2-rank run: tests/train/test_rank_failure.py)."""

import numpy as np
import pytest
import torch

from granite_train.parallel.env import Env
from granite_train.train import memory


@pytest.mark.skipif(not memory._CLEAR_REFS.exists(), reason="needs Linux /proc/self/clear_refs")
def test_the_host_peak_is_per_step():
    meter = memory.MemoryMeter(Env.single(torch.device("cpu")))
    meter.start_step()
    block = np.ones(300 * 2 ** 20 // 8)  # 300 MiB, touched
    high = meter.record()["host_rss_peak_gib"]
    del block
    meter.start_step()  # the next step starts from what is resident now
    low = meter.record()["host_rss_peak_gib"]
    assert high - low >= 0.25, (high, low)
    assert abs(low - memory.host_rss_gib()) < 0.05


def test_one_rank_reports_itself_as_the_maximum():
    record = memory.MemoryMeter(Env.single(torch.device("cpu"))).record()
    assert record["host_rss_peak_gib"] == record["host_rss_peak_gib_max_rank"] > 0
    assert "device_peak_gib" not in record  # CPU: no device numbers
