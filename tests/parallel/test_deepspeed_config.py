"""The DeepSpeed config we generate: buffer sizes from the model, the user's JSON on top."""

import json

import pytest
import torch

from granite_train.cli import compose_config
from granite_train.errors import UserError
from granite_train.models import build_model
from granite_train.parallel.deepspeed_engine import deepspeed_config, memory_settings
from granite_train.parallel.env import Env

MOE = ["recipe=sft_tiny", "model=granitemoe-tiny", "model.arch.vocab_size=1000"]


def _model(cfg):
    return build_model(cfg.model.arch)


def test_buffers_follow_the_model_not_deepspeeds_defaults():
    cfg = compose_config([*MOE, "distributed.zero_stage=3"])
    model = _model(cfg)
    hidden = model.config.hidden_size
    layer = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
    sizes = memory_settings(model, 3)
    assert sizes == {"reduce_bucket_size": hidden * hidden,
                     "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                     "stage3_param_persistence_threshold": 10 * hidden,
                     "stage3_max_live_parameters": layer, "stage3_max_reuse_distance": layer,
                     "sub_group_size": 4 * hidden * hidden}
    assert sizes["stage3_max_live_parameters"] < sum(p.numel() for p in model.parameters())  # not the whole model
    zero2 = memory_settings(model, 2)
    assert zero2 == {"reduce_bucket_size": sizes["reduce_bucket_size"],
                     "allgather_bucket_size": sizes["reduce_bucket_size"]}
    config = deepspeed_config(cfg, Env.single(torch.device("cpu")), model)
    assert config["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False, **sizes}


def test_the_users_json_wins(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 12345}}))
    cfg = compose_config([*MOE, "distributed.zero_stage=2", f"distributed.deepspeed_config={user}"])
    config = deepspeed_config(cfg, Env.single(torch.device("cpu")), _model(cfg))
    assert config["zero_optimization"]["reduce_bucket_size"] == 12345
    assert config["zero_optimization"]["allgather_bucket_size"] == 192 * 192  # ours, where the user set nothing


@pytest.mark.parametrize("section, dtype, says", [
    ({"bf16": {"enabled": True}}, None, "asks for bf16 but the run trains in fp32"),
    ({"fp16": {"enabled": True}}, torch.bfloat16, "asks for fp16 but the run trains in bf16"),
])
def test_the_precision_is_trainer_dtypes_not_the_jsons(tmp_path, section, dtype, says):
    # An fms-hf-tuning ds.json often carries its own bf16/fp16 section: one line, not a
    # silently different precision.
    user = tmp_path / "ds.json"
    user.write_text(json.dumps(section))
    cfg = compose_config([*MOE, "distributed.zero_stage=2", f"distributed.deepspeed_config={user}"])
    with pytest.raises(UserError, match=says + ".*set trainer.dtype"):
        deepspeed_config(cfg, Env.single(torch.device("cpu"), autocast_dtype=dtype))
