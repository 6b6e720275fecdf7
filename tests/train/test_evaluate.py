"""evaluate(): token-exact eval loss (a per-example reference loop), independent of the
micro-batch size, the packing mode and the number of ranks; eval mode, no grad, mode restored."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from granite_train.config import DataConfig, TrainerConfig
from granite_train.data.eval import build_eval_data
from granite_train.parallel.env import Env
from granite_train.train.evaluate import eval_sums, evaluate

MAX_LEN = 64
CPU = Env(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), autocast_dtype=None)


def tiny_tokenizer():
    """A word-level tokenizer of a few hundred tokens (+ Granite role tokens): keeps the
    lm_head and the loss cheap on CPU."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from granite_train.data.tokenizer import EOS_TOKEN, GRANITE_SPECIAL_TOKENS, Tokenizer

    words = ["<unk>", "user", "assistant", "system", "ask", "say", "more"] + [str(i) for i in range(100)]
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(GRANITE_SPECIAL_TOKENS))
    return Tokenizer(backend, EOS_TOKEN, name="tiny-words")


def tiny_model(vocab_size):
    from granite_train.models import GraniteConfig, build_model

    torch.manual_seed(0)
    cfg = GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        initializer_range=0.1)
    return build_model(cfg, attn_backend="sdpa")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ev") / "eval.jsonl"
    rng = np.random.default_rng(3)
    with path.open("w") as f:
        for i in range(24):
            turns = [{"role": "user", "content": " ".join(["ask"] * int(rng.integers(1, 8)) + [str(i)])},
                     {"role": "assistant", "content": " ".join(["say", "more"] * int(rng.integers(1, 30)))}]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size).eval()


def eval_data(tok, path, micro=MAX_LEN, rank=0, world=1, packing="bfd", **kw):
    data = DataConfig(path="demo:chitchat", eval_path=str(path), max_length=MAX_LEN, packing=packing, **kw)
    trainer = TrainerConfig(tokens_per_step=512, micro_batch_tokens=micro)
    return build_eval_data(data, trainer, tok, rank, world)


def reference(model, data):
    """Per example: (sum of token losses, trained tokens), the example's first label masked as
    the collators do; summed over every eval example."""
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for i in range(data.num_examples):
            row = data.examples.fetch([i])[i]
            ids = torch.as_tensor(row["input_ids"], dtype=torch.int64)[None]
            labels = torch.as_tensor(row["labels"], dtype=torch.int64)[None].clone()
            labels[0, 0] = -100
            n = int((labels != -100).sum())
            loss_sum += float(model(input_ids=ids, labels=labels).loss.double()) * n
            count += n
    return loss_sum, count


def test_matches_per_example_loop(tok, eval_file, model):
    data = eval_data(tok, eval_file, micro=256)
    assert len(data) < data.num_examples  # several examples share a micro-batch
    ref_sum, ref_count = reference(model, data)
    out = evaluate(model, data, CPU)
    assert out["eval_tokens"] == ref_count == data.num_trained_tokens
    assert out["eval_examples"] == data.num_examples == 24
    assert out["eval_loss"] == pytest.approx(ref_sum / ref_count, rel=1e-6)
    assert out["eval_ppl"] == pytest.approx(math.exp(out["eval_loss"]), rel=1e-12)
    assert out["eval_time_s"] > 0
    # the chunked loss (model.loss_chunk_tokens) is the same number
    chunked = evaluate(model, data, CPU, loss_chunk_tokens=16)
    assert chunked["eval_loss"] == pytest.approx(out["eval_loss"], rel=1e-6)


def test_independent_of_micro_batch_packing_and_ranks(tok, eval_file, model):
    base = evaluate(model, eval_data(tok, eval_file, micro=MAX_LEN), CPU)
    for micro, packing in ((100, "bfd"), (256, "bfd"), (1024, "bfd"), (256, "greedy"), (256, "none")):
        out = evaluate(model, eval_data(tok, eval_file, micro=micro, packing=packing), CPU)
        assert out["eval_tokens"] == base["eval_tokens"]
        assert out["eval_loss"] == pytest.approx(base["eval_loss"], rel=1e-6), (micro, packing)
    # each rank evaluates a disjoint share; the sums over ranks (what all_reduce adds) agree
    for world, micro in ((2, 128), (3, 200)):
        total = torch.zeros(2, dtype=torch.float64)
        for rank in range(world):
            with torch.no_grad():
                total += eval_sums(model, eval_data(tok, eval_file, micro=micro, rank=rank, world=world),
                                   torch.device("cpu"))
        assert int(total[1]) == base["eval_tokens"]
        assert float(total[0] / total[1]) == pytest.approx(base["eval_loss"], rel=1e-6), world


def test_eval_mode_no_grad_and_mode_restored(tok, eval_file, model):
    data = eval_data(tok, eval_file, micro=256)
    seen = []
    hook = model.register_forward_hook(
        lambda m, args, out: seen.append((m.training, torch.is_grad_enabled(), out.loss.requires_grad)))
    try:
        model.train()
        first = evaluate(model, data, CPU)
        assert model.training  # back to training mode
        assert seen and all(s == (False, False, False) for s in seen)
        assert all(p.grad is None for p in model.parameters())
        model.eval()
        assert evaluate(model, data, CPU)["eval_loss"] == first["eval_loss"]  # deterministic
        assert not model.training  # a model in eval mode stays in it
    finally:
        hook.remove()
        model.eval()


WORKER = """
import json, sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[4])
import test_evaluate as t
from granite_train.parallel.env import Env
from granite_train.train.evaluate import evaluate

rank, init_file, out_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
tok = t.tiny_tokenizer()
env = Env(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), autocast_dtype=None)
out = evaluate(t.tiny_model(tok.vocab_size), t.eval_data(tok, sys.argv[5], micro=128, rank=rank, world=2), env)
if rank == 0:
    json.dump(out, open(out_file, "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_ranks_equal_one(tok, eval_file, model, tmp_path):
    out_file = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(tmp_path / "pg"), str(out_file), here,
                               str(eval_file)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    two = json.loads(out_file.read_text())
    one = evaluate(model, eval_data(tok, eval_file, micro=256), CPU)  # the same seed-0 weights
    assert two["eval_tokens"] == one["eval_tokens"] and two["eval_examples"] == one["eval_examples"]
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)
