"""QuaRot on tiny models: the rotated float model computes what the original does (exact in real arithmetic; in a
float64 model to ~1e-7, because transformers' RMSNorm computes in float32 whatever the model's dtype), and the
rotation really moves the weights and spreads an outlier channel."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import VOCAB, build_llama, build_opt, random_windows
from boa.core.errors import BoaError
from boa.models.adapter import adapter_for
from boa.transforms import QuaRot, transform_from_dict


def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def qwen2_with_biases() -> Qwen2ForCausalLM:
    torch.manual_seed(2)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


def randomise_norms(model) -> None:
    """Norm weights far from 1, so that folding them is tested (fresh models start at γ = 1)."""
    gen = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = 0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


MODELS = {"llama_gqa": build_llama, "llama_tied": tied_llama, "qwen2_biases": qwen2_with_biases}


@pytest.mark.parametrize("value_heads,online_down", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("family", MODELS)
def test_the_rotated_float_model_computes_the_same_logits(family, value_heads, online_down):
    model = MODELS[family]().double()
    randomise_norms(model)
    ids = random_windows(2, 16)
    expected = logits(model, ids)
    rotated = copy.deepcopy(model)
    adapter = adapter_for(model.config)
    QuaRot(seed=3, value_heads=value_heads, online_down=online_down).apply(rotated, adapter)
    got = logits(rotated, ids)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max())
    # ... though every linear of the blocks changed
    for name, p in rotated.named_parameters():
        if name.endswith("proj.weight"):
            assert not torch.allclose(p, model.get_parameter(name)), name
    if family == "llama_tied":
        assert rotated.lm_head.weight is rotated.model.embed_tokens.weight


def test_bf16_weights_are_fused_in_float32_as_exactly_as_in_float64(monkeypatch):
    """A bf16 model is rotated in float32 (half the bytes of float64): its fused weights are those of the same
    fusion computed in float64, but for the rare value within float32 rounding of a bf16 tie (then one ulp off)."""
    from boa.transforms import rotation

    model = build_llama().bfloat16()
    randomise_norms(model)
    adapter = adapter_for(model.config)
    fused = copy.deepcopy(model)
    QuaRot(seed=3).apply(fused, adapter)
    monkeypatch.setattr(rotation, "_exact", lambda t: t.double())
    QuaRot(seed=3).apply(model, adapter)
    changed = 0
    for name, p in fused.named_parameters():
        want = model.get_parameter(name)
        assert p.dtype == torch.bfloat16 and (p == want).float().mean() > 0.999, name
        assert ((p.float() - want.float()).abs() <= want.float().abs() / 64 + 1e-30).all(), name  # ≤ 1 bf16 ulp
        changed += not torch.equal(p, build_llama().bfloat16().get_parameter(name))
    assert changed > 10  # the fusion did move the weights


def test_without_the_online_hook_the_down_projection_is_wrong():
    """The online Hadamard is what makes down_proj's fused rotation right: removing its hooks changes the logits."""
    model = build_llama().double()
    ids = random_windows(2, 16)
    expected = logits(model, ids)
    handles = QuaRot(seed=0).apply(model, adapter_for(model.config))
    assert torch.allclose(logits(model, ids), expected, atol=1e-6)
    for handle in handles:
        handle.remove()
    assert not torch.allclose(logits(model, ids), expected, atol=1e-3)


def test_an_outlier_channel_is_spread_over_the_residual():
    model = build_llama().double()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 7] = 100.0  # a massive-activation channel
    ids = random_windows(2, 16)
    seen = {}
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: seen.__setitem__("x", args[0]))
    logits(model, ids)
    before = seen["x"].abs().amax(-1) / seen["x"].pow(2).mean(-1).sqrt()
    QuaRot(seed=0).apply(model, adapter_for(model.config))
    logits(model, ids)
    hook.remove()
    after = seen["x"].abs().amax(-1) / seen["x"].pow(2).mean(-1).sqrt()
    assert before.min() > 7 and after.max() < 3  # peak over rms: √64 = 8 for one channel, ≈ 1 when spread


def test_layernorm_models_are_refused():
    model = build_opt()
    with pytest.raises(BoaError, match="RMSNorm"):
        QuaRot().apply(model, adapter_for(model.config))


def test_the_settings_round_trip():
    transform = QuaRot(seed=7, online_down=False)
    assert transform_from_dict(transform.to_dict()) == transform
    with pytest.raises(BoaError, match="unknown transform"):
        transform_from_dict({"name": "spin"})
    with pytest.raises(BoaError, match="seed"):
        transform_from_dict({"name": "quarot", "seed": "x"})
