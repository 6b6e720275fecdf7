"""`python -m granite_train.info`: parameter counts against hand-computed formulas."""

from granite_train.info import _build, describe


def test_dense_counts_match_the_formula():
    model, _ = _build(["model.arch.vocab_size=1000", "model.arch.hidden_size=64",
                       "model.arch.intermediate_size=96", "model.arch.num_hidden_layers=3",
                       "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2"])
    info = describe(model, seq_len=128)
    H, I, L, V, kv = 64, 96, 3, 1000, 2 * 16
    per_layer = H * H + 2 * H * kv + H * H + 3 * H * I + 2 * H  # q, k+v, o, mlp, 2 norms
    assert info["parameters_total"] == V * H + L * per_layer + H  # tied head
    assert info["parameters_active"] == info["parameters_total"]
    assert info["layer_pattern"] == "attentionx3"


def test_moe_active_parameters_count_top_k_experts():
    model, _ = _build(["model=granitemoe-tiny", "model.arch.vocab_size=1000"])
    info = describe(model, seq_len=128)
    c = model.config
    expert_params = c.num_hidden_layers * c.num_local_experts * 3 * c.hidden_size * c.intermediate_size
    inactive = expert_params * (c.num_local_experts - c.num_experts_per_tok) // c.num_local_experts
    assert info["parameters_total"] - info["parameters_active"] == inactive
    assert info["experts"] == "2 of 8"
