"""Nothing read back from a checkpoint runs code (granite_train/serialization.py)."""

import os

import pytest
import torch

from granite_train.errors import UserError
from granite_train.serialization import safe_load


class Payload:
    """Unpickling this creates a file: what a planted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def plant(path, marker, wrap=lambda p: {"state": p}):
    """Write a torch file at `path` whose unpickling would create `marker`."""
    torch.save(wrap(Payload(marker)), path)


def test_a_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "optimizer.pt"
    plant(bad, marker)
    with pytest.raises(UserError, match=r"refusing to load .*optimizer.pt: it names posix.mkdir") as err:
        safe_load(bad)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_tensors_plain_data_and_rng_states_load(tmp_path):
    from granite_train.train.rng import rng_state

    state = {"t": torch.arange(3), "groups": [{"role": "hidden", "betas": (0.9, 0.95), "moe": True}], "rng": rng_state()}
    torch.save(state, tmp_path / "ok.pt")
    back = safe_load(tmp_path / "ok.pt")
    assert torch.equal(back["t"], state["t"]) and back["groups"] == state["groups"]


def test_old_numpy_rng_states_still_load(tmp_path):
    # RNG files written before the plain-data format hold numpy arrays: allowed, they run nothing.
    import numpy as np

    torch.save({"numpy": np.random.get_state()}, tmp_path / "rank_0.pt")
    kind, key, *_ = safe_load(tmp_path / "rank_0.pt")["numpy"]
    assert kind == "MT19937" and key.dtype == np.uint32


def test_not_a_torch_file_is_one_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04K\x01.")  # a bare pickle: torch would unpickle it as a legacy file
    try:
        safe_load(junk)
    except UserError as err:
        assert "\n" not in str(err)
    except Exception as err:  # what torch raises for a non-zip file it cannot read
        pytest.fail(f"{type(err).__name__}: {err}")
