"""granite_train/compat.py: every non-public torch and DeepSpeed behaviour we rely on, exercised
directly, so an upgrade that moves one fails here by name rather than inside a run (and that
DeepSpeed's own checkpoint loader cannot be made to run a planted pickle); and the library
internals we replaced with public parts, checked equal to what they replaced."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from granite_train import compat


def test_grouped_mm_is_found():
    # torch >= 2.9 has it publicly; the MoE layer falls back to a per-expert loop without one.
    kernel = compat.grouped_mm_kernel()
    assert kernel is not None and callable(kernel)


def test_cpu_bf16_probe_answers():
    assert compat.cpu_has_native_bf16() in (True, False)


def test_parameter_slots_hold_a_parameter_registered_as_none():
    # param_roles.mark takes an absent bias by name; torch's public views skip it (and so
    # named_param_roles, iterating them, never sees a None).
    linear = nn.Linear(2, 2, bias=False)
    slots = compat.parameter_slots(linear)
    assert slots["weight"] is linear.weight and "bias" in slots and slots["bias"] is None
    assert dict(linear.named_parameters(recurse=False, remove_duplicate=False)) == {"weight": linear.weight}
    linear.weight = nn.Parameter(torch.zeros(2, 2))  # a live view: a swapped Parameter is seen
    assert slots["weight"] is linear.weight
    with pytest.raises(TypeError):
        slots["weight"] = None  # read-only


def test_byte_level_bpe_from_public_parts_is_tokenizers_own():
    # data/tokenizer.py builds GPT-2's BPE itself instead of reaching into ByteLevelBPETokenizer.
    tokenizers = pytest.importorskip("tokenizers")
    from granite_train.data.tokenizer import GRANITE_SPECIAL_TOKENS, bundled_gpt2_files, byte_level_bpe

    files = bundled_gpt2_files()
    ours, theirs = byte_level_bpe(*files), tokenizers.ByteLevelBPETokenizer(*map(str, files))
    for t in (ours, theirs):
        t.add_special_tokens(list(GRANITE_SPECIAL_TOKENS))
    assert ours.to_str() == theirs.to_str()  # the same pipeline, as tokenizer.json writes it
    texts = ["Hello world", " leading space", "", "  \t\n", "a<|end_of_text|>b",
             "<|start_of_role|>user<|end_of_role|> Hi wörld, 1234!\n<|end_of_text|>\n",
             "Granite 4.0-H: ÀÉÎ õü  naïve \t\n  def f(x):\n    return x**2  # 🚀 <|end_of_text|>"]
    for text in texts:
        for special in (False, True):
            a, b = ours.encode(text, add_special_tokens=special), theirs.encode(text, add_special_tokens=special)
            assert (a.ids, a.offsets, a.tokens) == (b.ids, b.offsets, b.tokens), text
        assert ours.decode(a.ids, skip_special_tokens=False) == theirs.decode(b.ids, skip_special_tokens=False)


# One process, its own process group: the DeepSpeed contracts compat.py relies on.
DEEPSPEED_CONTRACTS = textwrap.dedent("""
    import torch, torch.distributed as dist
    from torch import nn
    from granite_train import compat
    from granite_train.parallel.env import init_process_group
    from granite_train.parallel.grad_norm import clip_by_global_norm

    init_process_group("gloo", torch.device("cpu"), 1)
    deepspeed = compat.import_deepspeed(torch.device("cpu"))
    from deepspeed.moe.utils import is_moe_param

    # 1. Expert groups from DeepSpeed's own MoE layer.
    groups = compat.ExpertGroups(torch.device("cpu"), num_experts=4, size=1)
    assert groups.name == "ep_size_1" and groups.rank == 0, (groups.name, groups.rank)
    assert dist.get_world_size(groups.group) == 1

    # 2. The marker switches the engine's MoE handling on; tagged weights are DeepSpeed's experts.
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Linear(4, 4)
            self.marker = compat.deepspeed_moe_marker(torch.device("cpu"), 4, 1)

        def forward(self, x):
            return self.model(x)

    torch.manual_seed(0)
    module = Wrapped()
    compat.tag_expert_params([module.model.weight], groups.name)
    assert is_moe_param(module.model.weight) and not is_moe_param(module.model.bias)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "steps_per_print": 2 ** 62}
    optimizer = compat.GuardedAdamW(module.model.parameters(), lr=0.1,
                                    clip_grads=lambda ps: clip_by_global_norm(ps, 0.5))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    assert engine.has_moe_layers, "DeepSpeed no longer detects its MoE layer in the module"

    # 3. ZeRO-0 reads the optimizer's norm and skip flag.
    x = torch.randn(3, 4)
    engine.backward(engine(x).pow(2).sum())
    expected = float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in module.model.parameters())))
    engine.step()
    assert abs(engine.get_global_grad_norm() - expected) <= 1e-9 * expected, (engine.get_global_grad_norm(), expected)
    assert engine.skipped_steps == 0
    before = module.model.weight.detach().clone()
    engine.backward(engine(x).pow(2).sum())
    optimizer.force_skip = True
    engine.step()
    assert engine.skipped_steps == 1, "DeepSpeed no longer reads the optimizer's overflow flag"
    assert torch.equal(module.model.weight, before)

    # 4. ZeRO writes one optimizer shard file per rank under the names compat counts.
    zero1 = nn.Linear(4, 4)
    engine1, _, _, _ = deepspeed.initialize(model=zero1, optimizer=torch.optim.AdamW(zero1.parameters()),
                                            config={**config, "zero_optimization": {"stage": 1}})
    engine1.backward(engine1(x).sum())
    engine1.step()
    import pathlib, sys
    out = pathlib.Path(sys.argv[1])
    engine1.save_checkpoint(str(out), tag="t", save_latest=False)
    assert compat.zero_saved_ranks(out / "t") == 1, sorted(p.name for p in (out / "t").iterdir())
    # ... which ZeroWeights reads offline by compat.ZeroCheckpointNames (ZeRO 0-2: the whole module)
    from granite_train.parallel.zero_checkpoint import ZeroWeights
    names = compat.ZeroCheckpointNames
    saved_weights = ZeroWeights(out / "t")
    assert saved_weights.world == 1 and torch.equal(saved_weights("weight"), zero1.weight.detach())
    # ... and a ZeRO 1/2 optimizer takes this rank's state back out of a list of every rank's.
    from deepspeed.checkpoint.constants import SINGLE_PARTITION_OF_FP32_GROUPS as MASTERS
    from granite_train.serialization import safe_load
    shard = safe_load(next((out / "t").glob("zero_pp_rank_*_optim_states.pt")))[names.OPTIMIZER_STATE_DICT]
    engine1.backward(engine1(x).sum())
    engine1.step()  # the fp32 masters move on
    compat.load_zero_optimizer_shard(engine1.optimizer, shard, rank=0, world=1)
    restored = engine1.optimizer.state_dict()[MASTERS]
    assert all(torch.equal(a, b) for a, b in zip(restored, shard[MASTERS])), "the saved fp32 masters were not loaded"
    # ... in bf16 too (DeepSpeed prefixes those shards with bf16_)
    zero1b = nn.Linear(4, 4)
    engine1b, _, _, _ = deepspeed.initialize(model=zero1b, optimizer=torch.optim.AdamW(zero1b.parameters()),
                                             config={**config, "bf16": {"enabled": True},
                                                     "zero_optimization": {"stage": 1}})
    engine1b.backward(engine1b(x.bfloat16()).float().sum())
    engine1b.step()
    engine1b.save_checkpoint(str(out / "b"), tag="t", save_latest=False)
    assert compat.zero_saved_ranks(out / "b" / "t") == 1, sorted(p.name for p in (out / "b" / "t").iterdir())

    # 5. DeepSpeed's loader reads its files through ours: its ZeRO shards load, a planted one is refused.
    from granite_train.errors import UserError
    from granite_train.serialization import safe_load
    compat.use_safe_checkpoint_loads(engine1, safe_load)
    assert engine1.load_checkpoint(str(out), tag="t")[0] is not None
    import os

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(out / "pwned"),))

    shard = next((out / "t").glob("zero_pp_rank_*_optim_states.pt"))
    torch.save({"optimizer_state_dict": Payload()}, shard)
    try:
        engine1.load_checkpoint(str(out), tag="t")
        raise AssertionError("a planted DeepSpeed shard was loaded")
    except UserError as exc:
        assert "refusing to load" in str(exc), exc
    assert not (out / "pwned").exists()

    # 6. The effective bucket sizes: DeepSpeed's defaults, and a user's value where one is set.
    sizes = compat.zero_settings({"stage": 2, "reduce_bucket_size": 1000})
    assert sizes["reduce_bucket_size"] == 1000 and sizes["allgather_bucket_size"] > 0, sizes
    assert set(sizes) == {"reduce_bucket_size", "allgather_bucket_size"}
    sizes3 = compat.zero_settings({"stage": 3, "stage3_max_live_parameters": 123, "stage3_prefetch_bucket_size": 5})
    assert (sizes3["max_live_parameters"], sizes3["prefetch_bucket_size"]) == (123, 5), sizes3
    assert set(sizes3) == {"reduce_bucket_size", "prefetch_bucket_size", "max_live_parameters",
                           "param_persistence_threshold", "sub_group_size"}

    # 7. The deprecated collective DeepSpeed calls does not warn (once per rank otherwise).
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        compat.import_deepspeed(torch.device("cpu"))  # filters are re-applied on top of "default"
        dist.all_gather_into_tensor(torch.zeros(2), torch.ones(2))
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]

    # 8. ZeRO-3 parameters: partitioned weights are marked and carry their whole shape and size.
    from deepspeed.runtime.zero.utils import is_zero_param
    z3 = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4))
    config3 = {**config, "zero_optimization": {"stage": 3}}
    deepspeed.zero.Init(module=z3, config_dict_or_path=config3, mem_efficient_linear=False)
    w, plain = z3[0].weight, nn.Linear(4, 6).weight
    assert compat.is_zero3_partitioned(w) and is_zero_param(w) and w.numel() < 24, w.shape
    assert compat.full_shape(w) == (6, 4) and compat.full_numel(w) == 24, (compat.full_shape(w), compat.full_numel(w))
    assert not compat.is_zero3_partitioned(plain) and not is_zero_param(plain)
    assert compat.full_shape(plain) == (6, 4) and compat.full_numel(plain) == 24

    # 9. DeepSpeed's checkpoint names: its constants, and its ZeRO-3 files read back by ZeroWeights
    # (a frozen weight too: ZeRO 2/3 save those as fragments of the model states).
    from deepspeed.checkpoint import constants
    for key in ("OPTIMIZER_STATE_DICT", "FP32_FLAT_GROUPS", "PARAM_SHAPES", "FROZEN_PARAM_SHAPES",
                "FROZEN_PARAM_FRAGMENTS"):
        assert getattr(names, key) == getattr(constants, key), (key, getattr(names, key), getattr(constants, key))
    z3[1].bias.requires_grad_(False)
    engine3, _, _, _ = deepspeed.initialize(model=z3, config=config3, optimizer=torch.optim.AdamW(
        [p for p in z3.parameters() if p.requires_grad]))
    engine3.backward(engine3(x).sum())
    engine3.step()
    engine3.save_checkpoint(str(out / "z3"), tag="t", save_latest=False)
    assert (out / "z3" / "t" / names.ZERO3_MODEL.format(rank=0)).is_file(), sorted((out / "z3" / "t").iterdir())
    z3_weights = ZeroWeights(out / "z3" / "t")
    assert z3_weights.stage == 3 and "1.bias" in z3_weights._frozen, z3_weights.shapes
    with deepspeed.zero.GatheredParameters(list(z3.parameters())):
        for name, p in z3.named_parameters():
            assert torch.equal(z3_weights(name), p.detach()), name
    print("contracts hold")
""")


@pytest.mark.slow
def test_deepspeed_contracts(tmp_path):
    import deepspeed  # noqa: F401 (a hard dependency: a broken install fails here, never skips)
    script = tmp_path / "contracts.py"
    script.write_text(DEEPSPEED_CONTRACTS)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True,
                          timeout=300, env={**env, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0 and "contracts hold" in proc.stdout, proc.stderr[-3000:]


def test_a_deepspeed_older_than_the_lower_bound_is_refused_in_one_line():
    """pyproject.toml's bound, checked at run time too: older releases ignore
    managed_gradient_accumulation silently and would reduce gradients every micro-batch."""
    import deepspeed

    from granite_train.errors import UserError

    compat.check_deepspeed_version(deepspeed.__version__)  # the installed one passes
    compat.check_deepspeed_version(compat.MIN_DEEPSPEED)
    for old in ("0.19.4", "0.14.0"):
        with pytest.raises(UserError, match=rf"DeepSpeed {old} is too old: .*pip install 'deepspeed>=0\.19\.5'"):
            compat.check_deepspeed_version(old)
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'"deepspeed>={compat.MIN_DEEPSPEED}"' in pyproject  # one bound, stated twice
