"""An expert-parallel checkpoint's experts/ (models/expert_shards.py): slices written as each rank
holds them, any range read back across slices (a resume with the same slicing, an export of a
whole layer), and an incomplete or overlapping set refused in one line."""

import pytest
import torch

from granite_train.errors import UserError
from granite_train.models.expert_shards import ExpertSlices, save_slice

KEY = "model.layers.0.block_sparse_moe.input_linear.weight"
KEY1 = "model.layers.1.block_sparse_moe.input_linear.weight"


def _write(tmp_path, ranges, total=6):
    full = torch.arange(total * 3 * 2, dtype=torch.float32).view(total, 3, 2)
    for r in ranges:  # one file per layer and slice
        save_slice({KEY: full[r.start:r.stop]}, tmp_path, r, total, layer=0)
        save_slice({KEY1: -full[r.start:r.stop]}, tmp_path, r, total, layer=1)
    return full


def test_any_range_reads_back_across_the_slices(tmp_path):
    full = _write(tmp_path, [range(0, 2), range(2, 4), range(4, 6)])
    slices = ExpertSlices(tmp_path)
    assert slices.keys == [KEY, KEY1] and slices.shape(KEY) == (6, 3, 2)
    assert torch.equal(slices.read(KEY), full)  # every expert (an export)
    assert torch.equal(slices.read(KEY1, range(3, 6)), -full[3:6])
    assert torch.equal(slices.read(KEY, range(2, 4)), full[2:4])  # one rank's own slice
    assert torch.equal(slices.read(KEY, range(1, 5)), full[1:5])  # another slicing: across files
    assert slices.read(KEY, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("ranges,message", [
    ([range(0, 2), range(4, 6)], "slices 0-1, 4-5"),
    ([range(0, 4), range(2, 6)], "slices 0-3, 2-5"),
])
def test_a_set_of_slices_that_misses_or_repeats_experts_is_refused(tmp_path, ranges, message):
    _write(tmp_path, ranges)
    with pytest.raises(UserError, match=f"does not hold every expert once \\({message}\\)"):
        ExpertSlices(tmp_path)


def test_a_missing_layer_file_is_refused(tmp_path):
    _write(tmp_path, [range(0, 3), range(3, 6)])
    next(tmp_path.glob("experts-00003-00005-of-00006.layer-00001.safetensors")).unlink()
    with pytest.raises(UserError, match="the slices hold different tensors"):
        ExpertSlices(tmp_path)


def test_a_slice_must_hold_its_range(tmp_path):
    with pytest.raises(ValueError, match="holds 3 experts"):
        save_slice({KEY: torch.zeros(3, 2)}, tmp_path, range(0, 2), 4, layer=0)
