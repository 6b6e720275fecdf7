"""Padding-free forward: a packed row equals its examples run alone (logits, loss, gradients)."""

import logging
import sys

import pytest
import torch
import torch.nn.functional as F

VOCAB = 128  # as in conftest.py
LENGTHS = [1, 5, 17, 1, 33]


def _examples(lengths=LENGTHS, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def _labels(ids):
    labels = ids.clone()
    labels[0] = -100  # the collator masks each example's first token
    return labels


def _pack(examples):
    """What the padding-free collator produces for `examples`."""
    input_ids = torch.cat(examples).unsqueeze(0)
    labels = torch.cat([_labels(e) for e in examples]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(len(e)) for e in examples]).unsqueeze(0)
    seq_idx = torch.cat([torch.full((len(e),), i, dtype=torch.int32) for i, e in enumerate(examples)]).unsqueeze(0)
    cu = torch.tensor([0] + [len(e) for e in examples], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return dict(input_ids=input_ids, labels=labels, position_ids=position_ids, seq_idx=seq_idx,
                cu_seq_lens=cu, max_seq_len=max(len(e) for e in examples))


def packed_vs_per_example_grads(model, examples, checkpointing=False):
    """(max relative gradient difference, packed loss, per-example token-sum loss): the packed
    row's loss against the same token sum computed one example at a time."""
    batch = _pack(examples)
    n_trained = int((batch["labels"][:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    model.set_activation_checkpointing(checkpointing)
    packed_loss = model(**batch).loss
    packed_loss.backward()
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.set_activation_checkpointing(False)
    total = 0.0
    for e in examples:
        out = model(input_ids=e.unsqueeze(0), labels=_labels(e).unsqueeze(0))
        total = total + out.loss * int((_labels(e)[1:] != -100).sum())  # back to a token sum
    alone_loss = total / n_trained
    alone_loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    alone = [p.grad.clone() for p in model.parameters()]
    return _rel_grad_diff(model, packed, alone), packed_loss.detach(), alone_loss.detach()


def _rel_grad_diff(model, grads_a, grads_b):
    worst = 0.0
    for (name, _), a, b in zip(model.named_parameters(), grads_a, grads_b):
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return worst


def test_packed_logits_equal_per_example(tiny_model):
    model = tiny_model().eval()
    examples = _examples()
    batch = _pack(examples)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        alone = torch.cat([model(input_ids=e.unsqueeze(0)).logits[0] for e in examples])
        # Boundaries alone are enough: positions restart per example when position_ids is None,
        # and seq_idx alone gives the boundaries when cu_seq_lens is absent.
        no_pos = model(input_ids=batch["input_ids"], cu_seq_lens=batch["cu_seq_lens"]).logits[0]
        seq_idx_only = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             seq_idx=batch["seq_idx"]).logits[0]
        unpacked = model(input_ids=batch["input_ids"]).logits[0]
    assert (packed - alone).abs().max().item() <= 1e-5
    assert (no_pos - alone).abs().max().item() <= 1e-5
    assert (seq_idx_only - alone).abs().max().item() <= 1e-5
    assert (unpacked - alone).abs().max().item() > 1e-3  # the test can tell leakage apart


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_gradients_equal_per_example(tiny_model, checkpointing):
    model = tiny_model(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    worst, packed_loss, alone_loss = packed_vs_per_example_grads(model, _examples(), checkpointing)
    assert torch.allclose(packed_loss, alone_loss, rtol=1e-6, atol=0)
    assert worst <= 1e-5


def test_padded_batch_matches_per_example(tiny_model):
    model = tiny_model().eval()
    examples = _examples([3, 17, 9, 1])
    L = max(len(e) for e in examples)
    input_ids = torch.stack([F.pad(e, (0, L - len(e)), value=0) for e in examples])
    with torch.no_grad():
        padded = model(input_ids=input_ids).logits
        for row, e in enumerate(examples):
            alone = model(input_ids=e.unsqueeze(0)).logits[0]
            assert (padded[row, :len(e)] - alone).abs().max().item() <= 1e-5


def test_padded_and_packed_give_the_same_loss(tiny_model):
    model = tiny_model().eval()
    examples = _examples([4, 17, 9])
    L = max(len(e) for e in examples)
    input_ids = torch.stack([F.pad(e, (0, L - len(e))) for e in examples])
    labels = torch.stack([F.pad(_labels(e), (0, L - len(e)), value=-100) for e in examples])
    with torch.no_grad():
        padded = model(input_ids=input_ids, labels=labels).loss
        packed = model(**_pack(examples)).loss
    assert abs(padded.item() - packed.item()) <= 1e-6


def test_loss_is_shifted_token_mean_cross_entropy(tiny_model):
    model = tiny_model()
    batch = _pack(_examples())
    batch["labels"][0, 10:14] = -100  # e.g. prompt tokens inside the 17-token example
    out = model(**batch)
    logits, labels = out.logits[0], batch["labels"][0]
    terms = [F.cross_entropy(logits[t], labels[t + 1]) for t in range(len(labels) - 1) if labels[t + 1] != -100]
    manual = torch.stack(terms).sum() / len(terms)
    assert len(terms) == len(labels) - len(LENGTHS) - 4
    assert abs(out.loss.item() - manual.item()) <= 1e-6
    # Nothing to train on: 0, not NaN (keeps gradient accumulation finite).
    empty = model(input_ids=batch["input_ids"], labels=torch.full_like(labels, -100).unsqueeze(0)).loss
    assert empty.item() == 0.0


def test_trailing_filler_after_last_boundary_is_isolated(tiny_model):
    model = tiny_model().eval()
    examples = _examples([5, 7])
    batch = _pack(examples)
    ids = torch.cat([batch["input_ids"], torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        padded_row = model(input_ids=ids, cu_seq_lens=batch["cu_seq_lens"]).logits[0, :12]
        exact = model(input_ids=batch["input_ids"], cu_seq_lens=batch["cu_seq_lens"]).logits[0]
    assert (padded_row - exact).abs().max().item() <= 1e-6


def test_bf16_autocast_forward_backward(tiny_model):
    model = tiny_model()
    batch = _pack(_examples())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_backend_is_logged_once_and_flash_never_imported_on_cpu(tiny_model, caplog):
    from granite_train.errors import UserError
    from granite_train.models import GraniteForCausalLM

    model = tiny_model()
    batch = _pack(_examples())
    with caplog.at_level(logging.INFO, logger="granite_train.models"):
        for _ in range(3):
            model(input_ids=batch["input_ids"], cu_seq_lens=batch["cu_seq_lens"])
    lines = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert len(lines) == 1 and "scaled_dot_product_attention" in lines[0]
    assert "flash_attn" not in sys.modules

    flash = GraniteForCausalLM(model.config, attn_backend="flash")
    with pytest.raises(UserError, match="attn_backend=flash cannot run: needs a CUDA device"):
        flash(input_ids=batch["input_ids"])
    varlen = GraniteForCausalLM(model.config, attn_backend="varlen")
    with pytest.raises(UserError, match="attn_backend=varlen cannot run: needs a CUDA device"):
        varlen(input_ids=batch["input_ids"])
    with pytest.raises(UserError, match="attn_backend='xformers'"):
        GraniteForCausalLM(model.config, attn_backend="xformers")
