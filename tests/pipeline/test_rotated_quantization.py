"""Every method on a QuaRot-rotated model through the pipeline: the run rotates the model once, quantizes the rotated
weights, and boa.save / boa.load rebuild the same model (fused weights + the run-time Hadamards); formats that
cannot hold the run-time part refuse it."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import boa
from boa.core.errors import BoaError
from boa.export import export_compressed_tensors, export_gptq
from boa.models.adapter import adapter_for
from boa.transforms import ActivationQuant, KVQuant, QuaRot

from conftest import VOCAB


@torch.no_grad()
def logits(model, windows):
    return model(input_ids=windows, use_cache=False).logits


def tied_llama():
    torch.manual_seed(4)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


METHODS = {"rtn": boa.RTN(bits=4, group_size=16), "gptq": boa.GPTQ(bits=4, group_size=16),
           "boa": boa.BoA(bits=4, group_size=16), "turboboa": boa.TurboBoA(bits=4, group_size=16, rows_per_step=4),
           "aespa": boa.Aespa(init=boa.TurboBoA(bits=4, group_size=16, rows_per_step=4), rounding_iters=5)}


@pytest.mark.parametrize("name", METHODS)
def test_each_method_runs_on_the_rotated_model_and_round_trips(name, calib, heldout, tmp_path, monkeypatch):
    model = tied_llama()
    config = boa.QuantConfig(METHODS[name], transforms=(QuaRot(seed=1),))
    result = boa.quantize(model, config, calib, progress=False)
    assert model.boa_transforms == config.transforms
    out = boa.save(result, tmp_path / "out")
    loaded, _, loaded_config = boa.load(out)
    assert loaded_config == config
    monkeypatch.setenv("BOA_KERNELS", "torch")
    assert torch.equal(logits(loaded, heldout), logits(model, heldout))


SETTINGS = {"w4a8": (ActivationQuant(8),), "w4a4": (ActivationQuant(4),),
            "w4a4kv4": (ActivationQuant(4), KVQuant(4))}


@pytest.mark.parametrize("method", ["gptq", "boa"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_a_rotated_weight_activation_model_round_trips(setting, method, calib, heldout, tmp_path, monkeypatch):
    """W4A8 / W4A4 / W4A4-KV4: the loaded model re-attaches the Hadamards, the activation quantizers (its packed
    layers then multiply integer codes on the int8 kernels) and the KV quantizers; BoA's attention capture runs
    through the KV-quantized attention. The integer path equals the in-memory fake quantization to float rounding
    at A8; at A4 a rounding difference upstream can move a token's code by one step (1/15 of its range), so there
    the logits agree on average."""
    model = tied_llama()
    config = boa.QuantConfig(METHODS[method], transforms=(QuaRot(seed=1), *SETTINGS[setting]))
    result = boa.quantize(model, config, calib, progress=False)
    loaded, _, loaded_config = boa.load(boa.save(result, tmp_path / "out"))
    assert loaded_config == config
    layer = loaded.model.layers[0].mlp.down_proj
    assert layer.activations == (config.transforms[1].bits, 0.9) and len(layer._forward_pre_hooks) == 1  # Hadamard
    expected, got = logits(model, heldout), logits(loaded, heldout)
    if config.transforms[1].bits == 8:
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max())
    else:
        assert (got - expected).abs().mean() < 1e-2 * expected.abs().mean()
    weight_only = tied_llama()
    boa.quantize(weight_only, boa.QuantConfig(METHODS[method], transforms=(QuaRot(seed=1),)), calib, progress=False)
    assert not torch.allclose(logits(weight_only, heldout), expected)  # the activations are quantized indeed


def test_float_statistics_quantize_as_weight_only_then_switch_the_activations_on(calib, heldout):
    """ActivationQuant(calibrate=False): the codes are those of the weight-only run on the rotated model (nothing
    was quantized while calibrating), and the returned model computes with quantized activations."""
    method = boa.GPTQ(bits=4, group_size=16)
    weight_only = tied_llama()
    expected = boa.quantize(weight_only, boa.QuantConfig(method, transforms=(QuaRot(),)), calib, progress=False)
    model = tied_llama()
    config = boa.QuantConfig(method, transforms=(QuaRot(), ActivationQuant(4, calibrate=False)))
    got = boa.quantize(model, config, calib, progress=False)
    assert all(torch.equal(got.layers[n].codes, expected.layers[n].codes) for n in got.layers)
    assert not torch.allclose(logits(model, heldout), logits(weight_only, heldout))
    calibrated = boa.quantize(tied_llama(), boa.QuantConfig(method, transforms=(QuaRot(), ActivationQuant(4))),
                              calib, progress=False)
    assert any(not torch.equal(calibrated.layers[n].codes, expected.layers[n].codes) for n in got.layers)


def test_the_run_quantizes_the_rotated_weights(calib):
    """The codes are those of the rotated model: quantizing a model rotated by hand gives the same ones."""
    method = boa.GPTQ(bits=3, group_size=16)
    by_hand = tied_llama()
    QuaRot(seed=2).apply(by_hand, adapter_for(by_hand.config))
    expected = boa.quantize(by_hand, method, calib, progress=False).layers
    got = boa.quantize(tied_llama(), boa.QuantConfig(method, transforms=(QuaRot(seed=2),)), calib,
                       progress=False).layers
    assert set(got) == set(expected)
    for name in got:
        assert torch.equal(got[name].codes, expected[name].codes), name


def test_a_model_is_rotated_once(calib):
    model = tied_llama()
    config = boa.QuantConfig(boa.RTN(bits=4), transforms=(QuaRot(),))
    boa.quantize(model, config, progress=False)
    with pytest.raises(BoaError, match="already transformed"):
        boa.quantize(model, config, progress=False)


def test_exports_refuse_what_their_formats_cannot_describe(tmp_path):
    refusals = [(export_gptq, (QuaRot(),), "run-time rotations"),
                (export_compressed_tensors, (QuaRot(),), "8-bit per-token activations without clipping"),
                (export_compressed_tensors, (ActivationQuant(8),), "--a-clip 1"),
                (export_compressed_tensors, (ActivationQuant(8, clip_ratio=1.0), KVQuant(8)), "boa's own format")]
    for i, (export, transforms, message) in enumerate(refusals):
        result = boa.quantize(tied_llama(), boa.QuantConfig(boa.RTN(bits=4), transforms=transforms), progress=False)
        with pytest.raises(BoaError, match=message):
            export(result.model, result.layers, tmp_path / str(i))
        assert not (tmp_path / str(i)).exists()


def test_compressed_tensors_records_8_bit_per_token_activations(tmp_path):
    import json

    result = boa.quantize(tied_llama(), boa.QuantConfig(boa.RTN(bits=4, group_size=16),
                                                        transforms=(ActivationQuant(8, clip_ratio=1.0),)),
                          progress=False)
    export_compressed_tensors(result.model, result.layers, tmp_path / "ct")
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [g["input_activations"] for g in groups.values()] == [
        {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}]


def test_rotation_helps_gptq_where_a_channel_is_an_outlier(calib, heldout):
    """A massive-activation channel in the residual makes 3-bit GPTQ much worse; on the rotated model its output
    error is lower (the point of the rotation)."""
    base = tied_llama()
    with torch.no_grad():
        base.model.embed_tokens.weight[:, 5] *= 40
    expected = logits(base, heldout)
    errors = {}
    for rotate in (False, True):
        model = copy.deepcopy(base)
        transforms = (QuaRot(seed=0),) if rotate else ()
        boa.quantize(model, boa.QuantConfig(boa.GPTQ(bits=3, group_size=-1), transforms=transforms), calib,
                     progress=False)
        errors[rotate] = float((logits(model, heldout) - expected).pow(2).mean())
    assert errors[True] < 0.7 * errors[False], errors
