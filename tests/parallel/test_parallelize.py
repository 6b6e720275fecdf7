"""parallelize(model, cfg, env): one process, plain data parallel (the DeepSpeed and expert
parallel paths run under torchrun in tests/train/test_zero.py)."""

import pytest
import torch

from granite_train.cli import compose_config
from granite_train.errors import UserError
from granite_train.models import GraniteConfig, build_model
from granite_train.parallel import Env
from granite_train.parallel.engine import PlainEngine
from granite_train.parallel.parallelize import parallelize


def _model():
    cfg = GraniteConfig(model_type="granitemoe", vocab_size=64, hidden_size=32, intermediate_size=16,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                        num_local_experts=4, num_experts_per_tok=2)
    return build_model(cfg)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plain_run_gets_the_plain_engine_and_its_plan(checkpointing):
    cfg = compose_config(["model=granitemoe-tiny", f"model.activation_checkpointing={str(checkpointing).lower()}"])
    model = _model()
    engine = parallelize(model, cfg, Env.single())
    assert isinstance(engine, PlainEngine) and engine.model is model
    plan = engine.plan
    assert plan.world_size == 1 and plan.zero_stage is None and plan.expert is None
    assert plan.matmul_params == model.active_matmul_params()
    assert not plan.lockstep_forwards and plan.compiled == {}
    assert model.activation_checkpointing is checkpointing
    # One optimizer over every trainable weight, the plain torch AdamW.
    assert type(engine.optimizer) is torch.optim.AdamW
    in_groups = {id(p) for g in engine.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("experts", [1, 2])
def test_zero0_in_bf16_is_refused_before_any_collective(experts):
    # DeepSpeed's ZeRO-0 bf16 optimizer hands ours fp32 copies and updates unlike ZeRO 1-3.
    cfg = compose_config(["model=granitemoe-tiny", "distributed.zero_stage=0",
                          f"distributed.expert_parallel_size={experts}"])
    two_ranks_bf16 = Env(0, 2, 0, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(UserError, match="zero_stage=1 or 2 .*, or trainer.dtype=fp32"):
        parallelize(_model(), cfg, two_ranks_bf16)
