"""granite_train/compat.py: every non-public torch and DeepSpeed behaviour we rely on, exercised
directly, so an upgrade that moves one fails here by name rather than inside a run (and that
DeepSpeed's own checkpoint loader cannot be made to run a planted pickle)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from granite_train import compat


def test_grouped_mm_is_found():
    # torch >= 2.9 has it publicly; the MoE layer falls back to a per-expert loop without one.
    kernel = compat.grouped_mm_kernel()
    assert kernel is not None and callable(kernel)


def test_cpu_bf16_probe_answers():
    assert compat.cpu_has_native_bf16() in (True, False)


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
    print("contracts hold")
""")


@pytest.mark.slow
def test_deepspeed_contracts(tmp_path):
    pytest.importorskip("deepspeed")
    script = tmp_path / "contracts.py"
    script.write_text(DEEPSPEED_CONTRACTS)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True,
                          timeout=300, env={**env, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0 and "contracts hold" in proc.stdout, proc.stderr[-3000:]
