"""granitemoehybrid (Mamba-2 + attention + MoE): transformers parity and padding-free exactness.

transformers' CPU path leaks across packed examples (REFERENCE.md section 2), so it is the
reference one example at a time, unpacked.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from granite_train.models import GraniteConfig, build_model, load_model, save_model

from .test_packing import _examples as packing_examples, _pack, packed_vs_per_example_grads

import transformers

VOCAB = 128
# 1, shorter than d_conv (4), = chunk (8), non-multiples of it; the packed row crosses chunks.
LENGTHS = [1, 3, 8, 13, 30, 2]
LAYER_TYPES = ["mamba", "attention", "mamba", "mamba"]
HF_TOL = 1e-4
PACK_TOL = 1e-5


def _hf_kwargs(**overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, shared_intermediate_size=48,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
              num_experts_per_tok=2, layer_types=LAYER_TYPES, mamba_n_heads=8, mamba_n_groups=2,
              mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
              embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
              logits_scaling=6.0, initializer_range=0.1, tie_word_embeddings=True, max_position_embeddings=256)
    kw.update(overrides)
    return kw


@torch.no_grad()
def _perturb(model):
    """Non-default norms, Mamba scalars and conv biases, so every parameter matters."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.add_(0.1 * torch.randn_like(p))
        elif name.endswith(("dt_bias", ".D", "conv1d.bias")):
            p.add_(0.3 * torch.randn_like(p))
        elif name.endswith("A_log"):
            p.add_(0.5 * torch.randn_like(p))


@pytest.fixture
def make_hybrid_checkpoint(tmp_path):
    def _make(name="hf", seed=0, **overrides):
        torch.manual_seed(seed)
        hf = transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(**_hf_kwargs(**overrides)))
        _perturb(hf)
        hf.eval()
        hf.config._attn_implementation = "eager"
        out = tmp_path / name
        hf.save_pretrained(out)
        return out, hf

    return _make


def _ours(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = _hf_kwargs(**overrides)
    model = build_model(GraniteConfig(model_type="granitemoehybrid", **kw))
    _perturb(model)
    return model


def _examples(lengths=LENGTHS, seed=3):
    return packing_examples(lengths, seed)


def _packed_vs_reference(ours, reference, examples):
    """max |ours packed - reference(example alone)| over all tokens."""
    batch = _pack(examples)
    with torch.no_grad():
        packed = ours(input_ids=batch["input_ids"], cu_seq_lens=batch["cu_seq_lens"],
                      position_ids=batch["position_ids"]).logits[0]
        alone = torch.cat([reference(input_ids=e.unsqueeze(0)).logits[0] for e in examples])
    return (packed - alone).abs().max().item()


@pytest.mark.parametrize("variant", [
    dict(),  # NoPE, MoE + shared MLP, n_groups 2
    dict(position_embedding_type="rope", mamba_n_groups=1, tie_word_embeddings=False),
    dict(num_local_experts=0, mamba_chunk_size=4, mamba_proj_bias=True, mamba_conv_bias=False,
         time_step_limit=(0.01, 3.0), layer_types=["attention", "mamba", "mamba", "attention"]),
])
def test_load_transformers_hybrid_matches_per_example(make_hybrid_checkpoint, variant):
    path, hf = make_hybrid_checkpoint(**variant)
    ours = load_model(path).eval()
    assert ours.config.model_type == "granitemoehybrid"
    assert [ours.config.mixer_type(i) for i in range(4)] == variant.get("layer_types", LAYER_TYPES)
    assert ours.config.uses_rope == (variant.get("position_embedding_type") == "rope")
    examples = _examples()
    diff = _packed_vs_reference(ours, hf, examples)
    print(f"granitemoehybrid {variant}: max |ours packed - transformers per example| = {diff:.3g}")
    assert diff <= HF_TOL
    # ... and the transformers leak is real: the packed row through transformers differs.
    with torch.no_grad():
        hf_packed = hf(input_ids=_pack(examples)["input_ids"]).logits[0]
        alone = torch.cat([hf(input_ids=e.unsqueeze(0)).logits[0] for e in examples])
    assert (hf_packed - alone).abs().max().item() > 1e-3


def test_packed_logits_equal_per_example():
    model = _ours().eval()
    examples = _examples()
    batch = _pack(examples)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], cu_seq_lens=batch["cu_seq_lens"]).logits[0]
        alone = torch.cat([model(input_ids=e.unsqueeze(0)).logits[0] for e in examples])
        seq_idx = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(LENGTHS)).unsqueeze(0)
        by_seq_idx = model(input_ids=batch["input_ids"], seq_idx=seq_idx.to(torch.int32)).logits[0]
        unpacked = model(input_ids=batch["input_ids"]).logits[0]
    assert (packed - alone).abs().max().item() <= PACK_TOL
    assert (by_seq_idx - alone).abs().max().item() <= PACK_TOL
    assert (unpacked - alone).abs().max().item() > 1e-3  # the test can tell leakage apart


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_gradients_equal_per_example(checkpointing):
    model = _ours(tie_word_embeddings=False, position_embedding_type="rope")
    worst, packed_loss, alone_loss = packed_vs_per_example_grads(model, _examples(), checkpointing)
    assert torch.allclose(packed_loss, alone_loss, rtol=1e-6, atol=0)
    print(f"packed vs per-example gradients: max relative diff {worst:.3g}")
    assert worst <= PACK_TOL


def test_trailing_filler_and_padded_rows():
    model = _ours().eval()
    examples = _examples([5, 11])
    batch = _pack(examples)
    ids = torch.cat([batch["input_ids"], torch.zeros(1, 6, dtype=torch.long)], dim=1)
    L = 11
    padded_ids = torch.stack([F.pad(e, (0, L - len(e))) for e in examples])
    with torch.no_grad():
        filler = model(input_ids=ids, cu_seq_lens=batch["cu_seq_lens"]).logits[0, :16]
        exact = model(input_ids=batch["input_ids"], cu_seq_lens=batch["cu_seq_lens"]).logits[0]
        padded = model(input_ids=padded_ids).logits
        for row, e in enumerate(examples):
            alone = model(input_ids=e.unsqueeze(0)).logits[0]
            assert (padded[row, :len(e)] - alone).abs().max().item() <= PACK_TOL
    assert (filler - exact).abs().max().item() <= 1e-6


@pytest.mark.parametrize("variant", [dict(), dict(position_embedding_type="rope", tie_word_embeddings=False)])
def test_save_model_loads_in_transformers(tmp_path, variant):
    ours = _ours(**variant).eval()
    out = tmp_path / "ours"
    save_model(ours, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GraniteMoeHybridForCausalLM"]
    assert config["model_type"] == "granitemoehybrid" and config["layer_types"] == LAYER_TYPES
    theirs = transformers.GraniteMoeHybridForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert theirs.config.mamba_chunk_size == 8 and theirs.config.mamba_n_groups == 2
    diff = _packed_vs_reference(ours, theirs, _examples())
    print(f"our save -> transformers {variant}: max diff {diff:.3g}")
    assert diff <= HF_TOL
    again = load_model(out).eval()
    assert again.config == ours.config
    batch = _pack(_examples())
    del batch["labels"]
    with torch.no_grad():  # same packed forward, reloaded weights: bit-exact
        assert torch.equal(ours(**batch).logits, again(**batch).logits)


def test_hybrid_config_round_trip_and_defaults():
    cfg = GraniteConfig.from_hf_dict({"model_type": "granitemoehybrid", "vocab_size": 100, "hidden_size": 64,
                                      "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "layers_block_type": ["mamba", "attention"], "mamba_n_heads": 8,
                                      "mamba_d_head": "auto", "time_step_limit": [0.0, {"__float__": "Infinity"}]})
    assert cfg.layer_types == ["mamba", "attention"] and cfg.resolved_mamba_d_head == 16
    assert cfg.num_local_experts == 8 and cfg.shared_intermediate_size == 1024 and cfg.position_embedding_type is None
    assert cfg.mamba_chunk_size == 256 and cfg.time_step_limit == [0.0, float("inf")]
    assert not cfg.tie_word_embeddings and not cfg.uses_rope
    cfg.validate()
    d = cfg.to_hf_dict()
    assert d["layer_types"] == ["mamba", "attention"] and d["mamba_d_head"] == 16 and "mlp_bias" not in d
    assert GraniteConfig.from_hf_dict({**d, "model_type": "granitemoehybrid"}) == cfg
    # transformers 5's in-memory names are accepted too.
    assert GraniteConfig.from_hf_dict({"model_type": "granitemoehybrid", "num_hidden_layers": 2,
                                       "layer_types": ["linear_attention", "full_attention"]}
                                      ).layer_types == ["mamba", "attention"]
    # A dense config.json carries none of the hybrid keys.
    dense = GraniteConfig(vocab_size=10).to_hf_dict()
    assert not any(k.startswith("mamba_") or k in ("layer_types", "time_step_limit") for k in dense)


def test_omegaconf_schema_accepts_hybrid_fields():
    import omegaconf
    schema = omegaconf.OmegaConf.structured(GraniteConfig)
    merged = omegaconf.OmegaConf.merge(schema, {"model_type": "granitemoehybrid", "layer_types": ["mamba"],
                                                "time_step_limit": [0.0, 2.0]})
    cfg = omegaconf.OmegaConf.to_object(merged)
    assert cfg.layer_types == ["mamba"] and cfg.time_step_limit == [0.0, 2.0]


def test_bf16_autocast_forward_backward():
    model = _ours()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**_pack(_examples()))
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("changes, expected", [
    (dict(layer_types=["mamba"]), "needs layer_types with num_hidden_layers=4"),
    (dict(layer_types=["mamba", "conv", "mamba", "mamba"]), "unknown entries ['conv']"),
    (dict(mamba_n_heads=6), "mamba_n_heads=6 x mamba_d_head"),
    (dict(mamba_n_groups=3), "mamba_n_groups=3 must divide"),
    (dict(position_embedding_type="alibi"), "position_embedding_type='alibi'"),
])
def test_hybrid_config_errors(changes, expected):
    from granite_train.errors import UserError
    with pytest.raises(UserError, match=None) as e:
        GraniteConfig(model_type="granitemoehybrid", **_hf_kwargs(**changes)).validate()
    assert expected in str(e.value)


def test_flops_add_the_ssd_scan_to_the_parameter_term():
    model = _ours()
    c = model.config
    seq = 200
    params = model.num_parameters(exclude_embeddings=True) + (model.lm_head.weight.numel() if c.tie_word_embeddings else 0)
    expert = c.num_hidden_layers * c.num_local_experts * 3 * c.hidden_size * c.intermediate_size
    params -= expert * (c.num_local_experts - c.num_experts_per_tok) // c.num_local_experts
    kinds = [c.mixer_type(i) for i in range(c.num_hidden_layers)]
    H, P, N, Q = c.mamba_n_heads, c.resolved_mamba_d_head, c.mamba_d_state, min(c.mamba_chunk_size, seq)
    ssd = kinds.count("mamba") * 6 * H * (Q * N + Q * P + 2 * P * N)
    attn = kinds.count("attention") * 12 * c.num_attention_heads * c.resolved_head_dim * seq
    assert model.flops_per_token(seq) == pytest.approx(6 * params + attn + ssd, rel=1e-12)
    assert "mamba" in kinds and "attention" in kinds and ssd > 0
