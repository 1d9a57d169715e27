"""Fused projections (boa.models.fused; Phi-3's qkv_proj and gate_up_proj): split for the run, the parts quantized
as the layers they are, joined back into the model's own matrix. Checked against a Llama holding the same weights
unfused: the same codes, the same logits."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import boa
from boa.models.fused import SplitLinear, join_split, split_fused
from boa.transforms import ActivationQuant
from conftest import PHI3_SHAPE, build_phi3, random_windows


def phi3_and_its_llama_twin():
    """A random Phi-3 and the Llama computing the same function with q/k/v and gate/up as separate matrices."""
    phi3 = build_phi3()
    llama = LlamaForCausalLM(LlamaConfig(**PHI3_SHAPE)).eval()
    state = {}
    for name, tensor in phi3.state_dict().items():
        if "qkv_proj" in name:
            for part, rows in zip(("q_proj", "k_proj", "v_proj"), tensor.split([64, 32, 32])):
                state[name.replace("qkv_proj", part)] = rows
        elif "gate_up_proj" in name:
            for part, rows in zip(("gate_proj", "up_proj"), tensor.chunk(2)):
                state[name.replace("gate_up_proj", part)] = rows
        else:
            state[name] = tensor
    llama.load_state_dict(state)
    return phi3, llama


def test_split_linear_is_the_fused_layer_and_joins_back_bit_for_bit():
    torch.manual_seed(0)
    fused = nn.Linear(16, 10, bias=True)
    split = SplitLinear(fused, (("a", 3), ("b", 7)))
    x = torch.randn(5, 16)
    torch.testing.assert_close(split(x), fused(x), rtol=1e-6, atol=1e-6)
    assert split.a.out_features == 3 and torch.equal(split.b.weight, fused.weight[3:])
    joined = split.joined()
    assert torch.equal(joined.weight, fused.weight) and torch.equal(joined.bias, fused.bias)
    with pytest.raises(boa.BoaError, match="do not add up"):
        SplitLinear(fused, (("a", 3), ("b", 6)))


@pytest.mark.parametrize("method", [boa.GPTQ(bits=4, group_size=16, act_order=True),
                                    boa.TurboBoA(bits=3, group_size=16, rows_per_step=4),
                                    boa.QuantConfig(boa.GPTQ(bits=4, group_size=16), transforms=(ActivationQuant(8),))],
                         ids=["gptq", "turboboa", "gptq-a8"])
def test_phi3_is_quantized_as_its_unfused_twin_and_stored_fused(method, tmp_path):
    """The same codes as the Llama twin's q/k/v and gate/up stacked; the same logits, in memory and packed. With
    8-bit activations (A8) the fused layer reads its input rounded as the twin's parts do, in the run and after."""
    phi3, llama = phi3_and_its_llama_twin()
    windows, heldout = random_windows(8, 32), random_windows(2, 16, seed=1)
    ours = boa.quantize(phi3, method, windows, progress=False)
    twin = boa.quantize(llama, method, windows, progress=False)
    assert type(phi3.model.layers[0].self_attn.qkv_proj) is nn.Linear  # joined back
    for i in range(2):
        for fused, parts in (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                             ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))):
            got = ours.layers[f"model.layers.{i}.{fused}"]
            want = [twin.layers[f"model.layers.{i}.{p}"] for p in parts]
            assert torch.equal(got.codes, torch.cat([q.codes for q in want]))
            assert torch.equal(got.scale, torch.cat([q.scale for q in want]))
            assert torch.equal(got.g_idx, want[0].g_idx)
    with torch.no_grad():
        expected = llama(heldout).logits
        torch.testing.assert_close(phi3(heldout).logits, expected, rtol=1e-4, atol=1e-4)
        loaded, _, _ = boa.load(boa.save(ours, tmp_path / "q"))
        torch.testing.assert_close(loaded(heldout).logits, expected, rtol=1e-4, atol=1e-4)


def test_split_and_join_carry_the_codes_to_the_fused_names():
    phi3, _ = phi3_and_its_llama_twin()
    adapter = boa.models.adapter_for(phi3.config)
    split_fused(phi3, adapter)
    split_fused(phi3, adapter)  # idempotent
    assert isinstance(phi3.model.layers[1].mlp.gate_up_proj, SplitLinear)
    q = boa.core.quantizer.QuantizedWeight
    layers = {f"model.layers.0.mlp.gate_up_proj.{p}": q(torch.full((128, 64), i, dtype=torch.uint8),
                                                         torch.ones(128, 1), torch.zeros(128, 1),
                                                         torch.zeros(64, dtype=torch.int32), 4)
              for i, p in enumerate(("gate", "up"))}
    join_split(phi3, adapter, layers)
    assert list(layers) == ["model.layers.0.mlp.gate_up_proj"]
    assert layers["model.layers.0.mlp.gate_up_proj"].codes[:, 0].tolist() == [0] * 128 + [1] * 128


def test_the_fused_phi3_exports_to_compressed_tensors_that_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from boa.export import export_compressed_tensors

    phi3, _ = phi3_and_its_llama_twin()
    result = boa.quantize(phi3, boa.GPTQ(bits=4, group_size=16), random_windows(8, 32), progress=False)
    out = export_compressed_tensors(phi3, result.layers, tmp_path / "ct", config=result.config)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    heldout = random_windows(2, 16, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(heldout).logits, phi3(heldout).logits)
