"""Adapter runs end to end (fp32, CPU): what they save, that final/ loads in PEFT on
transformers' model, resume, `export --merge`, `model.adapter_path`, and ZeRO-3 / expert
parallelism on 2 ranks equal to 1."""

import json
import re
import shutil

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from granite_train.serialization import safe_load

from ..runs import torchrun_runs
from ..tiny_tokenizer import TINY_TOKENIZER, VOCAB_SIZE

pytestmark = pytest.mark.slow

VOCAB = VOCAB_SIZE  # the base checkpoint carries the tests' small tokenizer
ARCH = dict(model_type="granitemoehybrid", vocab_size=VOCAB, hidden_size=64, intermediate_size=32,
            shared_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2, layer_types=["mamba", "attention", "mamba"],
            mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
            mamba_chunk_size=16, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
            logits_scaling=6.0, initializer_range=0.1, tie_word_embeddings=True, max_position_embeddings=1024)
RUN = ["recipe=sft_tiny", "data.max_examples=300", "data.max_length=512", "trainer.tokens_per_step=2048",
       "trainer.micro_batch_tokens=1024", "trainer.dtype=fp32", "trainer.max_steps=4", "trainer.progress=false",
       "adapter=lora", "adapter.dropout=0", "adapter.targets=[attention,shared_mlp,mamba,experts,router]",
       "adapter.train_modules=[lm_head]", "optim.lr=2e-3"]


def curve(out):
    """(loss, grad norm) per train step of a run directory or a metrics file."""
    path = out if out.suffix == ".jsonl" else out / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in rows if r.get("split") != "eval"]


def assert_same_curve(a, b, rel):
    assert len(a) == len(b) == 4
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, rel=rel) and ga == pytest.approx(gb, rel=rel)


def assert_same_adapter(a, b, rel, name="adapter_model.safetensors"):
    x, y = load_file(a / name), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        assert (x[k] - y[k]).abs().max() <= rel * x[k].abs().max(), k


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small hybrid checkpoint with the tests' small tokenizer: what an adapter run fine-tunes."""
    from granite_train.data import load_tokenizer
    from granite_train.models import GraniteConfig, build_model, save_model

    path = tmp_path_factory.mktemp("base") / "granite-4.0-h-test"
    torch.manual_seed(0)
    save_model(build_model(GraniteConfig(**ARCH)), path)
    load_tokenizer(TINY_TOKENIZER, None).save(path)
    return path


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory, cli_at):
    root = tmp_path_factory.mktemp("straight")
    out = root / "run"
    proc = cli_at(root, *RUN, f"model.path={base}", "trainer.save_every=2", f"trainer.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out, proc.stderr


def _ours_adapted(base, adapter_dir):
    from granite_train.models import load_model
    from granite_train.models.lora import attach_lora
    from granite_train.models.peft_io import read_adapter
    from granite_train.train.adapter import load_adapter_weights

    model = load_model(base).eval()
    spec, paths, adapters, full = read_adapter(adapter_dir, model.config, model.config.num_local_experts)
    attach_lora(model, spec, paths=paths)
    load_adapter_weights(model, adapters, full, where=adapter_dir)
    return model


def test_an_adapter_run_saves_adapters_not_the_base(straight, base):
    _, out, log = straight
    assert "adapter: LoRA r=16 alpha=32" in log and "trainable parameters" in log
    final = out / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert not list(final.glob("model*.safetensors"))
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["modules_to_save"] == ["embed_tokens", "lm_head"]
    ckpt = out / "checkpoints" / "step_4"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(ckpt.rglob("model*.safetensors"))  # the frozen base is never copied
    weights = load_file(final / "adapter_model.safetensors")
    n_trainable = sum(t.numel() for k, t in weights.items() if "lora_" in k) + VOCAB * 64
    # the optimizer holds state for the trainable parameters only (Adam: exp_avg + exp_avg_sq)
    state = safe_load(ckpt / "optimizer.pt")["state"]
    assert sum(s["exp_avg"].numel() for s in state.values()) == n_trainable
    assert all(k.startswith("base_model.model.") for k in weights)


def test_final_loads_in_peft_on_transformers_with_equal_logits(straight, base):
    _, out, _ = straight
    theirs = transformers.GraniteMoeHybridForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    untouched = transformers.GraniteMoeHybridForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    theirs = peft.PeftModel.from_pretrained(theirs, out / "final").eval()
    ours = _ours_adapted(base, out / "final")
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = ours(ids).logits, theirs(input_ids=ids).logits, untouched(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4
    assert (a - c).abs().max() > 1e-3  # training moved it


def test_resume_reproduces_the_straight_run(straight, base, tmp_path, cli_at):
    root, ref, _ = straight
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "checkpoints" / "step_4")
    shutil.rmtree(out / "final")
    proc = cli_at(tmp_path, *RUN, f"model.path={base}", "trainer.save_every=2", f"trainer.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "step_2" in proc.stderr
    assert_same_curve(curve(out), curve(ref), rel=1e-6)
    assert_same_adapter(out / "final", ref / "final", rel=1e-6)


def test_export_merge_equals_the_adapted_model(straight, base, tmp_path):
    from granite_train.export import main as export_main
    from granite_train.models import load_model

    _, out, _ = straight
    assert export_main([str(out), str(tmp_path / "merged"), "--merge"]) == 0
    assert export_main([str(out / "final"), str(tmp_path / "merged2"), "--merge"]) == 0
    merged, merged2 = load_model(tmp_path / "merged").eval(), load_model(tmp_path / "merged2").eval()
    ours = _ours_adapted(base, out / "final")
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(ids).logits
        assert (merged(ids).logits - a).abs().max() <= 1e-5
        assert torch.equal(merged2(ids).logits, merged(ids).logits)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    run_tokenizer = json.loads((out / "checkpoints" / "step_4" / "model" / "tokenizer_config.json").read_text())
    assert json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text()) == run_tokenizer
    # without --merge: the adapter itself
    assert export_main([str(out), str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_model_adapter_path_continues_from_a_peft_adapter(straight, base, tmp_path, cli_at):
    """lr 0: the run's final adapter is the one it started from, and its r and targets are the file's."""
    _, out, _ = straight
    cont = tmp_path / "cont"
    proc = cli_at(tmp_path, *RUN, f"model.path={base}", f"model.adapter_path={out / 'final'}", "adapter.r=4",
                  "optim.lr=0", "optim.weight_decay=0", "trainer.max_steps=1", f"trainer.output_dir={cont}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "its r=16" in proc.stderr and f"from {out / 'final'}" in proc.stderr
    assert_same_adapter(cont / "final", out / "final", rel=0.0)


PARALLEL = {"zero3": ["distributed.zero_stage=3"],
            "zero2-ep2": ["distributed.zero_stage=2", "distributed.expert_parallel_size=2"],
            "cp2": ["distributed.context_parallel_size=2", "trainer.micro_batch_tokens=512"]}
RESUMED = ("zero3", "zero2-ep2")  # (context parallelism resumes with the plain engine, tested above)


@pytest.fixture(scope="module")
def two_ranks(base, tmp_path_factory):
    """Each parallel layout on 2 ranks, and the ZeRO ones resumed from step 2, in one launch."""
    root = tmp_path_factory.mktemp("two_ranks")
    runs = []
    for name, parallel in PARALLEL.items():
        out = root / name
        args = [*RUN, f"model.path={base}", *parallel, "trainer.save_every=2", f"trainer.output_dir={out}"]
        runs.append({"name": name, "args": args})
        if name in RESUMED:
            runs.append({"name": f"{name}-resumed", "args": args,
                         "copy": [[str(out / "metrics.jsonl"), str(root / f"{name}.jsonl")],
                                  [str(out / "final" / "adapter_model.safetensors"),
                                   str(root / f"{name}.safetensors")]],
                         "rmtree": [str(out / "checkpoints" / "step_4"), str(out / "final")]})
    proc, sections = torchrun_runs(runs, root)
    return root, proc, sections


@pytest.mark.parametrize("name", list(PARALLEL))
def test_two_ranks_equal_one(straight, two_ranks, name):
    """ZeRO-3 (the frozen base sharded), expert parallelism (each rank trains its own experts'
    adapters) and context parallelism (rows of 2 x 512 tokens) on 2 ranks: the straight run's
    curve and adapter; ZeRO-3 and expert parallelism then resumed from step 2."""
    _, ref, _ = straight
    root, proc, sections = two_ranks
    status, err = sections.get(name, (None, proc.stderr[-3000:]))
    assert status == 0, err[-3000:]
    out = root / name
    first = root / f"{name}.jsonl" if name in RESUMED else out / "metrics.jsonl"
    assert_same_curve(curve(first), curve(ref), rel=1e-5)
    adapter = root / f"{name}.safetensors" if name in RESUMED else out / "final" / "adapter_model.safetensors"
    assert_same_adapter(adapter.parent, ref / "final", rel=1e-3, name=adapter.name)  # Adam on near-zero gradients
    assert not list((out / "checkpoints" / "step_4").rglob("model*.safetensors"))
    if name not in RESUMED:
        return
    status, err = sections.get(f"{name}-resumed", (None, proc.stderr[-3000:]))
    assert status == 0, err[-3000:]
    assert "resuming from" in err
    assert_same_curve(curve(out), curve(ref), rel=1e-5)


@pytest.mark.parametrize("extra,message", [
    (["adapter.r=0"], "adapter.r=0 must be > 0"),
    (["adapter.targets=[attn]"], "adapter.targets=['attn']: unknown"),
    (["adapter.train_modules=[norm]"], "adapter.train_modules=['norm']"),
    (["optim.mup=true"], "optim.mup=true with adapter=lora"),
    (["trainer.compile=true"], "trainer.compile=true with adapter=lora"),
    (["model.adapter_path=/nonexistent/adapter"], "is not a directory"),
    (["adapter=none", "model.adapter_path=/tmp"], "needs adapter=lora"),
    (["adapter=none", "adapter.r=8"], "set but adapter=none (full fine-tuning)"),
])
def test_adapter_settings_errors(extra, message):
    from granite_train.cli import compose_config
    from granite_train.config import validate
    from granite_train.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        validate(compose_config([*RUN, *extra]))


def test_targets_the_model_lacks_and_a_foreign_base_are_one_line(cli, tmp_path, straight):
    proc = cli(*RUN, "model=granite-tiny", "adapter.targets=[experts]", "adapter.train_modules=[]",
               f"trainer.output_dir={tmp_path / 'e'}")
    assert proc.returncode == 2 and "match no module" in proc.stderr, proc.stderr[-2000:]
    from granite_train.errors import UserError
    from granite_train.export import export
    from granite_train.models import GraniteConfig, build_model, save_model

    other = tmp_path / "other"
    save_model(build_model(GraniteConfig(**{**ARCH, "hidden_size": 32, "mamba_n_heads": 2})), other)
    _, out, _ = straight
    with pytest.raises(UserError, match="is not the model the adapter was trained on"):
        export(out, tmp_path / "m1", merge=True, base=other)
    with pytest.raises(UserError, match="does not fit the base"):
        export(out / "final", tmp_path / "m2", merge=True, base=other)
