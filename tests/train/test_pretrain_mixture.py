"""recipe=pretrain_power from a prepared two-source mixture through the CLI: per-source tokens in
metrics.jsonl track the weights within one document at every step, long documents are trained
whole (as pieces), and a resumed run continues exactly."""

import json

import pytest

from granite_train.prepare import prepare

from ..tiny_tokenizer import TINY_TOKENIZER

pytestmark = pytest.mark.slow

MAX_LENGTH = 256
SMALL = ["recipe=pretrain_power", "model.arch.hidden_size=64", "model.arch.intermediate_size=128",
         "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2",
         "model.mup_base_width=32", "model.arch.logits_scaling=2.0", f"data.max_length={MAX_LENGTH}",
         "trainer.tokens_per_step=1024", "trainer.micro_batch_tokens=512", "trainer.max_tokens=7000",
         "scheduler.warmup_tokens=1024", "scheduler.decay_tokens=2048", "trainer.progress=false",
         f"data.tokenizer={TINY_TOKENIZER}"]
WEIGHTS = (0.7, 0.3)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    long_docs = root / "long.jsonl"  # documents of ~4-8x max_length
    long_docs.write_text("".join(json.dumps({"text": " ".join(f"d{i}w{k}" for k in range(300 + 150 * (i % 3)))}) + "\n"
                                 for i in range(24)))
    tok = f"data.tokenizer={TINY_TOKENIZER}"
    prepare(["recipe=pretrain_power", "data.max_examples=300", f"data.max_length={MAX_LENGTH}", tok],
            root / "shakespeare", 1 << 20)
    prepare(["recipe=pretrain_power", f"data.path={long_docs}", f"data.max_length={MAX_LENGTH}", tok],
            root / "long", 1 << 20)
    return root


def _sources(root):
    return (f"data.sources=[{{path:{root / 'shakespeare'},weight:{WEIGHTS[0]}}},"
            f"{{path:{root / 'long'},weight:{WEIGHTS[1]}}}]")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"split"' not in line and '"loss"' in line]


def test_mixture_shares_and_exact_resume(corpora, cli_at, tmp_path):
    straight = tmp_path / "straight"
    proc = cli_at(tmp_path, *SMALL, _sources(corpora), "trainer.max_steps=100", f"trainer.output_dir={straight}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data.sources[1] long, share 0.3" in proc.stderr and "split 24 documents" in proc.stderr
    rows = _rows(straight)
    assert len(rows) >= 7 and rows[-1]["tokens_seen"] >= 7000
    for r in rows:
        seen = [r["source_tokens_seen/shakespeare"], r["source_tokens_seen/long"]]
        assert sum(seen) == r["tokens_seen"]
        assert r["source_tokens/shakespeare"] + r["source_tokens/long"] == r["input_tokens"]
        for n, w in zip(seen, WEIGHTS):
            assert abs(n - w * r["tokens_seen"]) <= MAX_LENGTH, r

    resumed = tmp_path / "resumed"
    first = cli_at(tmp_path, *SMALL, _sources(corpora), "trainer.max_steps=3", f"trainer.output_dir={resumed}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli_at(tmp_path, *SMALL, _sources(corpora), "trainer.max_steps=100", f"trainer.output_dir={resumed}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    again = _rows(resumed)
    assert [r["step"] for r in again] == [r["step"] for r in rows]
    keys = ("loss", "grad_norm", "tokens", "input_tokens", "tokens_seen", "source_tokens_seen/long", "lr")
    for a, b in zip(rows, again):
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, rel=1e-6, abs=1e-9)
