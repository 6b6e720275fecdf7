"""Collation: packed rows match transformers' DataCollatorWithFlattening; padded rows are sane."""

import numpy as np
import pytest
import torch

from granite_train.data.collator import collate_packed, collate_padded, empty_micro_batch, is_empty

NAMES = {"cu_seq_lens_q": "cu_seq_lens", "max_length_q": "max_seq_len"}


def random_examples(rng, n, with_labels=True):
    out = []
    for _ in range(n):
        length = int(rng.choice([1, 1, 2, 3, int(rng.integers(1, 60))]))
        ids = rng.integers(0, 50000, size=length)
        ex = {"input_ids": ids.tolist()}
        if with_labels:
            labels = ids.copy()
            labels[rng.random(length) < 0.4] = -100
            ex["labels"] = labels.tolist()
        out.append(ex)
    return out


def test_reference_example():
    mb = collate_packed([{"input_ids": [10, 11, 12, 13, 14], "labels": [10, 11, 12, 13, 14]},
                         {"input_ids": [20, 21, 22], "labels": [20, 21, 22]}])
    assert mb["input_ids"].tolist() == [[10, 11, 12, 13, 14, 20, 21, 22]]
    assert mb["labels"].tolist() == [[-100, 11, 12, 13, 14, -100, 21, 22]]
    assert mb["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert mb["seq_idx"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]
    assert mb["cu_seq_lens"].tolist() == [0, 5, 8]
    assert mb["max_seq_len"] == 5


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("with_labels", [True, False])
def test_packed_equals_transformers(seed, with_labels):
    import transformers
    ref = transformers.DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True)
    rng = np.random.default_rng(seed)
    feats = random_examples(rng, int(rng.integers(1, 12)), with_labels)
    theirs = ref([dict(f) for f in feats])
    ours = collate_packed(feats)
    for key in ("input_ids", "labels", "position_ids", "seq_idx", "cu_seq_lens_q", "max_length_q"):
        a, b = ours[NAMES.get(key, key)], theirs[key]
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a, b), key
        else:
            assert a == b, key
    assert torch.equal(theirs["cu_seq_lens_k"], ours["cu_seq_lens"])


def test_collate_does_not_modify_examples():
    labels = np.array([5, 6, 7])
    collate_packed([{"input_ids": np.array([5, 6, 7]), "labels": labels}])
    assert labels.tolist() == [5, 6, 7]


def test_padded():
    mb = collate_padded([{"input_ids": [1, 2, 3], "labels": [1, -100, 3]}, {"input_ids": [4], "labels": [4]}],
                        pad_id=9)
    assert mb["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert mb["labels"].tolist() == [[-100, -100, 3], [-100, -100, -100]]
    assert mb["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert mb["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert mb["input_ids"].dtype == torch.int64
    assert mb["seq_idx"] is None and mb["cu_seq_lens"] is None


def test_empty_micro_batch():
    for padded in (False, True):
        mb = empty_micro_batch(padded)
        assert is_empty(mb) and mb["input_ids"].dim() == 2
    packed = empty_micro_batch(False)
    assert packed["cu_seq_lens"].tolist() == [0] and packed["max_seq_len"] == 0
    assert not is_empty(collate_packed([{"input_ids": [1]}]))
