"""boa.stats.GroupStatistics: one sequential group's LayerStats as a method's Needs declare them — input Hessians
(explicit sums over the layers' inputs), BoA's row factors for q/k/v only when the attention is needed, the v row
factor the needs name, dX terms only against an FP pass — in the statistics dtype whatever the model's."""
import pytest
import torch

import boa
from boa.algorithms import Needs
from boa.models import adapter_for
from boa.pipeline import BlockInputs
from boa.stats import GroupStatistics, run_fp_block

from conftest import build_llama, random_windows


def setup(with_fp=False):
    model = build_llama()
    adapter = adapter_for(model.config)
    block = adapter.blocks(model)[0]
    calib = random_windows(6, 16, seed=2)
    with torch.no_grad():
        inputs = BlockInputs.capture(model, [block], calib, torch.float32, with_fp=with_fp)
    return model, adapter, block, calib, inputs


def layer_inputs(model, calib, names):
    """Each named layer's input on every token, from one full-precision forward."""
    seen = {}

    def keep(name):
        def hook(module, args):
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1]).double()

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(keep(n)) for n in names]
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def test_hessians_only_for_a_method_without_attention():
    """GPTQ's needs: q/k/v share one H = 2E[xxᵀ] (the explicit sum over their common input, in float64 as asked),
    no row factors, no dX term."""
    model, adapter, block, calib, inputs = setup()
    group = list(adapter.qkv)
    with torch.no_grad():
        stats = GroupStatistics(model, adapter, boa.GPTQ().needs(), torch.float64)(block, group, inputs.hidden,
                                                                                   inputs.kwargs)
    assert set(stats) == set(group)
    x = layer_inputs(model, calib, [f"model.layers.0.{adapter.q_proj}"])[f"model.layers.0.{adapter.q_proj}"]
    for name in group:
        assert stats[name].H is stats[adapter.q_proj].H and stats[name].H.dtype == torch.float64
        assert stats[name].H_out is None and stats[name].D is None and stats[name].heads == 1
    torch.testing.assert_close(stats[adapter.q_proj].H, 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("v_row_factor", ["exact", "identity"])
def test_row_factors_for_qkv_when_the_attention_is_needed(v_row_factor):
    """BoA's needs: q_proj one row factor per query head, k_proj per kv head, v_proj per-head input Hessians with
    W_o,hᵀW_o,h ("exact") or none ("identity"); the other groups get plain input Hessians."""
    model, adapter, block, calib, inputs = setup()
    needs = boa.BoA(v_row_factor=v_row_factor).needs()
    statistics = GroupStatistics(model, adapter, needs, torch.float32)
    d, heads, kv, hidden = adapter.head_dim, adapter.n_heads, adapter.n_kv_heads, model.config.hidden_size
    with torch.no_grad():
        qkv = statistics(block, list(adapter.qkv), inputs.hidden, inputs.kwargs)
        o = statistics(block, [adapter.o_proj], inputs.hidden, inputs.kwargs)
    assert qkv[adapter.q_proj].H_out.shape == (heads, d, d)
    assert qkv[adapter.k_proj].H_out.shape == (kv, d, d)
    assert qkv[adapter.q_proj].H.shape == (hidden, hidden)
    assert qkv[adapter.v_proj].H.shape == (kv, hidden, hidden)
    if v_row_factor == "exact":
        assert qkv[adapter.v_proj].H_out.shape == (kv, d, d)
    else:
        assert qkv[adapter.v_proj].H_out is None
    assert qkv[adapter.v_proj].heads == kv
    assert o[adapter.o_proj].H_out is None and o[adapter.o_proj].H.shape == (heads * d, heads * d)
    # the plain Hessian of the o_proj input is what the GPTQ needs give too
    with torch.no_grad():
        plain = GroupStatistics(model, adapter, Needs(hessian=True), torch.float32)(block, [adapter.o_proj],
                                                                                    inputs.hidden, inputs.kwargs)
    torch.testing.assert_close(o[adapter.o_proj].H, plain[adapter.o_proj].H)


def test_dx_terms_only_against_an_fp_pass():
    """With the FP pass, each layer gets D = 2E[(x_fp − x_q)x_qᵀ]: zero while nothing before the layer is
    quantized, nonzero for o_proj once q/k/v were; without it, none."""
    model, adapter, block, calib, inputs = setup(with_fp=True)
    needs = boa.GPTQ(dx_alpha=0.25).needs()
    statistics = GroupStatistics(model, adapter, needs, torch.float64)
    with torch.no_grad():
        fp = run_fp_block(block, adapter, inputs.fp, inputs.kwargs, inputs.dtype, needs.attention)
        qkv = statistics(block, list(adapter.qkv), inputs.hidden, inputs.kwargs, fp)
        assert torch.count_nonzero(qkv[adapter.q_proj].D) == 0  # the paths agree before any quantization
        for name in adapter.qkv:
            layer = block.get_submodule(name)
            layer.weight.copy_(boa.RTN(bits=2).solve(layer.weight, None).dequantize())
        o = statistics(block, [adapter.o_proj], inputs.hidden, inputs.kwargs, fp)
        without = statistics(block, [adapter.o_proj], inputs.hidden, inputs.kwargs)
    D = o[adapter.o_proj].D
    assert D is not None and D.dtype == torch.float64 and float(D.abs().max()) > 0
    assert without[adapter.o_proj].D is None
    torch.testing.assert_close(without[adapter.o_proj].H, o[adapter.o_proj].H)


def test_dx_terms_from_the_first_windows_only():
    """dx_windows = 8 of 12 windows: the FP path carries the first forward batch only; every D (q/k/v's shared one,
    v_proj's attention-weighted one, o_proj's) is then the one a run on those 8 windows alone gives, bit for bit,
    while the input Hessians still see all 12 windows."""
    model = build_llama()
    adapter = adapter_for(model.config)
    block = adapter.blocks(model)[0]
    calib = random_windows(12, 16, seed=2)
    needs = boa.TurboBoA(dx_windows=8).needs()
    results = {}
    for name, windows, fp_windows in (("subset", calib, 8), ("first 8", calib[:8], 0), ("all", calib, 0)):
        state = {k: v.clone() for k, v in block.state_dict().items()}
        with torch.no_grad():
            inputs = BlockInputs.capture(model, [block], windows, torch.float32, with_fp=True, fp_windows=fp_windows)
            assert len(inputs.hidden) == (1 if windows is not calib else 2)
            assert len(inputs.fp) == (2 if name == "all" else 1)
            statistics = GroupStatistics(model, adapter, needs, torch.float64)
            fp = run_fp_block(block, adapter, inputs.fp, inputs.kwargs, inputs.dtype, needs.attention)
            for layer in adapter.qkv:  # the quantized path departs from the FP one from q/k/v on
                weight = block.get_submodule(layer).weight
                weight.copy_(boa.RTN(bits=2).solve(weight, None).dequantize())
            stats = statistics(block, list(adapter.qkv), inputs.hidden, inputs.kwargs, fp)
            stats.update(statistics(block, [adapter.o_proj], inputs.hidden, inputs.kwargs, fp))
        block.load_state_dict(state)
        results[name] = stats
    subset, first, every = results["subset"], results["first 8"], results["all"]
    for layer in (adapter.q_proj, adapter.v_proj, adapter.o_proj):
        assert torch.equal(subset[layer].D, first[layer].D), layer
        assert torch.equal(subset[layer].H, every[layer].H), layer
        assert not torch.equal(subset[layer].H, first[layer].H), layer
    assert float(subset[adapter.v_proj].D.abs().max()) > 0 and float(subset[adapter.o_proj].D.abs().max()) > 0
    assert not torch.equal(subset[adapter.o_proj].D, every[adapter.o_proj].D)
