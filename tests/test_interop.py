"""Parity with the real Hugging Face DeepseekV3ForCausalLM (transformers, torch CPU)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from k2jax.interop.deepseek_v3 import (InteropError, config_from_hf, from_hf_state_dict, load_hf_checkpoint,
                                       to_hf_state_dict)
from k2jax.model.moe import RouterBias
from k2jax.model.transformer import Transformer

HF = dict(vocab_size=320, hidden_size=64, intermediate_size=160, moe_intermediate_size=24, num_hidden_layers=3,
          first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
          num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
          qk_rope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, routed_scaling_factor=2.5,
          max_position_embeddings=256)


def _hf_model(**overrides):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**HF, **overrides})).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # larger than the default init so differences show
            p.normal_(0, 0.08) if p.ndim > 1 else p.uniform_(0.8, 1.2)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, module.e_score_correction_bias.numel()))
    return model


def _k2jax(hf_model, scan):
    cfg = dataclasses.replace(config_from_hf(hf_model.config.to_dict()), compute_dtype="float32", scan_layers=scan)
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    params, biases = from_hf_state_dict(sd, cfg)
    model = Transformer(cfg, nnx.Rngs(0))
    nnx.update(model, params)
    nnx.update(model, biases)
    return cfg, model, sd, params, biases


CASES = {"plain": {}, "q_lora": dict(q_lora_rank=24), "groups": dict(n_group=4, topk_group=2),
         "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})}


@pytest.mark.parametrize("case, scan", [(c, True) for c in CASES] + [("q_lora", False)])
def test_logits_match_transformers(case, scan):
    hf = _hf_model(**CASES[case])
    cfg, model, *_ = _k2jax(hf, scan)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        expected = hf(torch.as_tensor(tokens)).logits.numpy()
    logits, _ = model(jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-4, atol=2e-4)


def test_round_trip_both_expert_layouts(tmp_path):
    hf = _hf_model(q_lora_rank=24)
    cfg, _, sd, params, biases = _k2jax(hf, True)
    back = to_hf_state_dict(params, biases, cfg)
    assert set(back) == {k for k in sd if "rotary_emb" not in k}
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    # per-expert layout (checkpoint files) -> same params
    split = to_hf_state_dict(params, biases, cfg, fused_experts=False)
    params2, _ = from_hf_state_dict(split, cfg)
    np.testing.assert_array_equal(params2["moe_layers"]["ffn"]["wi_up"], params["moe_layers"]["ffn"]["wi_up"])
    # a saved checkpoint directory loads without any network access
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg3, params3, _ = load_hf_checkpoint(tmp_path)
    assert cfg3.attention.q_lora_rank == 24 and cfg3.num_dense_layers == 1
    np.testing.assert_array_equal(params3["embed"]["table"], params["embed"]["table"])


def test_bad_state_dicts_name_the_key():
    hf = _hf_model()
    cfg, _, sd, *_ = _k2jax(hf, True)
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.self_attn.kv_b_proj.weight"}
    with pytest.raises(InteropError, match="kv_b_proj"):
        from_hf_state_dict(missing, cfg)
    wrong = dict(sd, **{"model.norm.weight": np.ones(65, np.float32)})
    with pytest.raises(InteropError, match=r"model.norm.weight: expected shape \(64,\)"):
        from_hf_state_dict(wrong, cfg)
    extra = dict(sd, **{"model.layers.9.mlp.gate.weight": np.ones((8, 64), np.float32)})
    with pytest.raises(InteropError, match="no place"):
        from_hf_state_dict(extra, cfg)
    assert isinstance(nnx.state(Transformer(cfg, nnx.Rngs(0)), RouterBias), nnx.State)


@pytest.mark.parametrize("case", ["q_lora", "groups", "yarn"])
def test_config_to_hf_inverts_config_from_hf(case):
    from k2jax.interop.deepseek_v3 import config_to_hf

    cfg = config_from_hf(DeepseekV3Config(**{**HF, **CASES[case]}).to_dict())
    assert config_from_hf(config_to_hf(cfg)) == cfg
    assert config_from_hf(DeepseekV3Config(**config_to_hf(cfg)).to_dict()) == cfg  # as transformers reads it


def test_export_refuses_what_the_layout_cannot_hold():
    from k2jax.config import AttentionConfig, ModelConfig, MoEConfig
    from k2jax.interop.deepseek_v3 import config_to_hf

    with pytest.raises(InteropError, match="needs model.attention.kind='mla'.*this model has 'gqa'"):
        config_to_hf(ModelConfig(attention=AttentionConfig(kind="gqa", num_kv_heads=2)))
    with pytest.raises(InteropError, match="'softmax_topk'"):
        config_to_hf(ModelConfig(attention=AttentionConfig(kind="mla"), moe=MoEConfig(router="softmax_topk")))
