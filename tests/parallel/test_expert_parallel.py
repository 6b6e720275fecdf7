"""Expert-parallel MoE (parallel/expert_parallel.py: the layer holding its rank's experts, with
the all-to-all dispatcher) equals the unsharded layer: 2 gloo processes.

Each rank routes its own tokens; with its experts split over the ranks, the layer must give
the same outputs, router stats and input/router gradients as the full layer on that rank's
tokens, and each expert's weight gradient must be the sum of the full layers' gradients over
both ranks (the expert saw both ranks' tokens).
"""


import pytest
import torch
import torch.distributed as dist

from granite_train.errors import UserError
from granite_train.models import GraniteConfig
from granite_train.models.moe import MoE
from granite_train.parallel.expert_parallel import AllToAllDispatch, check_expert_parallel
from ..gloo_ranks import run_on_ranks

WORLD = 2
# (experts, top_k, tokens on rank 0, tokens on rank 1, router bias towards rank 0's experts)
CASES = [(4, 2, 37, 23, 0.0), (2, 1, 16, 9, 0.0), (8, 3, 40, 0, 0.0), (4, 2, 12, 30, 50.0)]


def _layer(experts, top_k, seed=0):
    torch.manual_seed(seed)
    cfg = GraniteConfig(model_type="granitemoe", vocab_size=16, hidden_size=24, intermediate_size=20,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                        num_local_experts=experts, num_experts_per_tok=top_k)
    moe = MoE(cfg).double()
    with torch.no_grad():
        for w in (moe.router.layer.weight, moe.input_linear.weight, moe.output_linear.weight):
            w.normal_(0, 0.3)
    return moe


def _run_case(rank, case, failures):
    experts, top_k, n0, n1, bias = case
    full, sharded = _layer(experts, top_k), _layer(experts, top_k)
    n_held = experts // WORLD
    local = range(rank * n_held, (rank + 1) * n_held)
    sharded.keep_experts(local, AllToAllDispatch(dist.group.WORLD, WORLD))
    assert sharded.input_linear.weight.shape[0] == len(local)

    torch.manual_seed(100 + rank)
    n = (n0, n1)[rank]
    x = torch.randn(1, n, 24, dtype=torch.float64)
    if bias:  # skew the routing: most rows go to rank 0's experts
        with torch.no_grad():
            for m in (full, sharded):
                m.router.layer.weight[: experts // 2] += bias / 24
    probe = torch.randn(1, n, 24, dtype=torch.float64)
    outs = {}
    for name, m in (("full", full), ("sharded", sharded)):
        xi = x.clone().requires_grad_(True)
        y, stats = m(xi)
        ((y * probe).sum() + stats[1].sum() * 0.1).backward()
        outs[name] = (y.detach(), stats.detach(), xi.grad, m.router.layer.weight.grad,
                      m.input_linear.weight.grad, m.output_linear.weight.grad)
    (yf, sf, gxf, grf, gif, gof), (ys, ss, gxs, grs, gis, gos) = outs["full"], outs["sharded"]
    # The full layers on both ranks together saw every token: their summed expert grads are what
    # the owner of each expert must hold.
    dist.all_reduce(gif)
    dist.all_reduce(gof)

    def check(what, a, b):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-10, atol=1e-12):
            failures.append(f"case {case} rank {rank}: {what} differs")

    check("output", ys, yf)
    check("stats", ss, sf)
    check("input grad", gxs, gxf)
    check("router grad", grs, grf)
    check("input_linear grad", gis, gif[local.start:local.stop])
    check("output_linear grad", gos, gof[local.start:local.stop])


def _save_case(rank, size, failures):
    """What a save (`DeepSpeedEngine.full_pieces`) gathers under expert parallelism: the weights
    every rank holds, then one MoE layer's experts at a time (counted on the all-gathers: never
    more than one layer's experts between two pieces), together bit-equal to the unsharded model."""
    import copy
    from types import SimpleNamespace
    from unittest import mock

    from granite_train.parallel.deepspeed_engine import DeepSpeedEngine
    from granite_train.parallel.plan import ExpertParallelPlan

    torch.manual_seed(0)
    full = _moe_model(experts=4, layers=3)
    sharded = copy.deepcopy(full)
    layers = [m for m in sharded.modules() if isinstance(m, MoE)]
    for layer in layers:
        layer.keep_experts(range(rank * 2, rank * 2 + 2), AllToAllDispatch(dist.group.WORLD, size))
    plan = ExpertParallelPlan(size=size, rank=rank, group=dist.group.WORLD, group_name="ep", num_experts=4,
                              params=tuple(p for layer in layers for w in (layer.input_linear, layer.output_linear)
                                           for p in w.stacks()))
    one_layer = sum(p.numel() * p.element_size() for w in (layers[0].input_linear, layers[0].output_linear)
                    for p in w.stacks()) * size
    gathered, real = [], dist.all_gather

    def counting(tensors, tensor, group=None):
        gathered.append(sum(t.numel() * t.element_size() for t in tensors))
        return real(tensors, tensor, group=group)

    merged, per_piece = {}, []
    with mock.patch.object(dist, "all_gather", counting):
        for piece in DeepSpeedEngine.full_pieces(SimpleNamespace(plan=SimpleNamespace(expert=plan), model=sharded)):
            per_piece.append(sum(gathered))
            gathered.clear()
            if set(piece) & set(merged):
                failures.append(f"rank {rank}: {sorted(set(piece) & set(merged))} in two pieces")
            merged.update(piece)
    if len(per_piece) != 1 + len(layers) or per_piece[0] != 0 or max(per_piece) > one_layer:
        failures.append(f"rank {rank}: gathered bytes per piece {per_piece}, one layer's experts are {one_layer}")
    want = full.state_dict()
    if set(merged) != set(want):
        failures.append(f"rank {rank}: keys differ: {sorted(set(merged) ^ set(want))}")
    bad = [k for k in want if k in merged and not torch.equal(merged[k], want[k])]
    if bad:
        failures.append(f"rank {rank}: {bad} differ from the unsharded model")


def _cases(rank, size, failures):
    for case in CASES:
        _run_case(rank, case, failures)
    _save_case(rank, size, failures)


@pytest.mark.slow
def test_sharded_experts_equal_the_full_layer(tmp_path):
    failures = run_on_ranks(tmp_path, WORLD, _cases)
    assert not failures, failures


def _moe_model(experts=4, layers=2):
    from granite_train.models import build_model

    cfg = GraniteConfig(model_type="granitemoe", vocab_size=64, hidden_size=24, intermediate_size=20,
                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                        num_local_experts=experts, num_experts_per_tok=2)
    return build_model(cfg)


def test_experts_must_split_evenly():
    with pytest.raises(UserError, match="4 experts per layer do not split over distributed.expert_parallel_size=3"):
        check_expert_parallel(_moe_model(4), 3, 3, "model.arch")
    with pytest.raises(UserError, match="does not divide the 3 rank"):
        check_expert_parallel(_moe_model(4), 2, 3, "model.arch")


def test_flops_are_counted_on_the_full_model():
    # MFU: after sharding a rank holds half of the experts; the trainer counts the matmul
    # weights before sharding and passes them in.
    model = _moe_model()
    full_params, full_flops = model.active_matmul_params(), model.flops_per_token(32)
    for layer in model.modules():
        if isinstance(layer, MoE):
            layer.keep_experts(range(2, 4), AllToAllDispatch(None, 2))
    assert model.active_matmul_params() < full_params
    assert model.flops_per_token(32, full_params) == full_flops


def test_a_rank_loads_only_its_own_experts(tmp_path):
    """`load_model(experts=...)`: each MoE layer holds, and reads from the files, only that
    slice of its experts (safetensors slices); it refuses to run before `parallelize` gives it
    a dispatcher. `load_slice` is the layout of DeepSpeed's expert-parallel groups."""
    from granite_train.cli import compose_config
    from granite_train.models import build_model, load_model, save_model
    from granite_train.parallel.expert_parallel import load_slice

    arch = compose_config(["model=granitemoe-tiny", "model.arch.vocab_size=300"]).model.arch
    torch.manual_seed(0)
    full = build_model(arch)
    save_model(full, tmp_path)
    E = arch.num_local_experts
    assert [load_slice(arch, 2, 4, r) for r in range(4)] == [range(0, E // 2), range(E // 2, E)] * 2
    # Sizes that do not fit (parallelize then says so): every expert is read.
    assert load_slice(arch, E + 1, E + 1, 0) is None and load_slice(arch, 2, 3, 0) is None
    held = load_slice(arch, 2, 2, 1)
    part = load_model(tmp_path, experts=held)
    want, got = full.state_dict(), part.state_dict()
    for key, w in want.items():
        if key.endswith(("input_linear.weight", "output_linear.weight")):
            assert got[key].shape[0] == E // 2 and torch.equal(got[key], w[held.start:held.stop]), key
        else:
            assert torch.equal(got[key], w), key
    with pytest.raises(RuntimeError, match="parallelize the model"):
        part(input_ids=torch.zeros(1, 4, dtype=torch.long))
