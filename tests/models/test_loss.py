"""The chunked loss equals the plain one (value and gradients), fp32."""

import torch

from granite_train.models import build_model, causal_lm_loss, chunked_causal_lm_loss
from granite_train.models.config import GraniteConfig


def _tiny_packed_batch():
    """A small dense model and one packed row of three examples (1, 14 and 25 tokens)."""
    cfg = GraniteConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, logits_scaling=3.0)
    model = build_model(cfg)
    ids = torch.randint(0, 97, (1, 40))
    return model, ids, torch.tensor([0, 1, 15, 40], dtype=torch.int32)


def test_chunked_loss_matches_plain_value_and_grads():
    torch.manual_seed(0)
    h = torch.randn(1, 50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 37, (1, 50))
    labels[0, [0, 7, 8, 30]] = -100
    plain = causal_lm_loss(h @ w.T, labels)
    gh, gw = torch.autograd.grad(plain, (h, w))
    for chunk in (1, 7, 16, 50, 64):
        chunked = chunked_causal_lm_loss(h, w, labels, chunk_tokens=chunk)
        ch, cw = torch.autograd.grad(chunked, (h, w))
        torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=0)
        torch.testing.assert_close(ch, gh, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(cw, gw, rtol=1e-10, atol=1e-12)


def test_model_without_logits_gives_same_loss_and_grads():
    torch.manual_seed(0)
    model, ids, cu = _tiny_packed_batch()
    labels = ids.clone()
    labels[0, [0, 1, 15]] = -100
    ref = model(input_ids=ids, cu_seq_lens=cu, labels=labels)
    ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()))
    out = model(input_ids=ids, cu_seq_lens=cu, labels=labels, loss_chunk_tokens=16)
    assert out.logits is None
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_trained_positions_loss_equals_the_full_logits_path():
    """return_logits=False (the trainer's path) computes logits only at trained positions:
    same loss and gradients as the full [T, V] path, plain and chunked, no trained token -> 0."""
    from granite_train.models.loss import trained_positions_loss

    torch.manual_seed(0)
    h = torch.randn(1, 50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 37, (1, 50))
    labels[0, :20] = -100  # a prompt
    labels[0, [30, 31, 49]] = -100
    plain = causal_lm_loss(h @ w.T, labels)
    gh, gw = torch.autograd.grad(plain, (h, w))
    for chunk in (0, 1, 7, 64):
        sparse = trained_positions_loss(h, w, labels, chunk_tokens=chunk)
        sh, sw = torch.autograd.grad(sparse, (h, w))
        torch.testing.assert_close(sparse, plain, rtol=1e-12, atol=0)
        torch.testing.assert_close(sh, gh, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sw, gw, rtol=1e-10, atol=1e-12)
    none = trained_positions_loss(h, w, torch.full_like(labels, -100))
    assert none.item() == 0.0

    model, ids, cu = _tiny_packed_batch()
    labels = ids.clone()
    labels[0, [0, 1, 2, 3, 15, 16, 17]] = -100
    ref = model(input_ids=ids, cu_seq_lens=cu, labels=labels)
    ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()))
    out = model(input_ids=ids, cu_seq_lens=cu, labels=labels, return_logits=False)
    assert out.logits is None
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
