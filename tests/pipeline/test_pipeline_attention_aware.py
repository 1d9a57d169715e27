"""The attention-aware methods (BoA, TurboBoA) through the pipeline: on tiny models (every architecture, an encoder,
save/load), and on real SmolLM2 blocks (the attention-aware loss against GPTQ's, group-wise refinement, the dX
correction against the FP block). GPTQ and RTN through the same loop: test_pipeline_gptq_rtn.py."""
import copy

import pytest
import torch

import boa
from boa.algorithms import method_from_dict
from boa.pipeline import BlockInputs
from boa.stats import GroupStatistics

from conftest import build_bert


@pytest.mark.parametrize("method", ["boa", "turboboa"])
def test_attention_aware_methods_run_on_every_architecture(tiny_model, calib, heldout, method, tmp_path,
                                                           word_tokenizer):
    """Every layer gets codes; the quantized model's held-out logits move less from FP than RTN's do; a saved model
    loads back to the same logits."""
    from boa.export import load, save

    with torch.no_grad():
        fp = tiny_model(input_ids=heldout).logits
    rtn_model = copy.deepcopy(tiny_model)
    boa.quantize(rtn_model, boa.RTN(bits=3, group_size=16), progress=False)
    result = boa.quantize(tiny_model, method_from_dict({"method": method, "bits": 3, "group_size": 16}), calib,
                          progress=False)
    adapter = boa.models.adapter_for(tiny_model.config)
    assert len(result.layers) == len(adapter.blocks(tiny_model)) * len(adapter.linear_names())
    with torch.no_grad():
        ours = tiny_model(input_ids=heldout).logits
        rtn = rtn_model(input_ids=heldout).logits
    assert float(((ours - fp) ** 2).mean()) < float(((rtn - fp) ** 2).mean())
    if tiny_model.config.model_type == "llama":
        save(result, tmp_path / "out", word_tokenizer)
        loaded, _, config = load(tmp_path / "out")
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=heldout).logits, ours)
        assert config.method.name == method and config == result.config


def first_blocks(n):
    model, tokenizer, adapter = boa.load_model("smollm2-135m")
    del model.model.layers[n:]
    model.config.num_hidden_layers = n
    return model, tokenizer, adapter


@pytest.fixture(scope="module")
def smollm2_block0_stats():
    """Block 0 of SmolLM2's q/k/v statistics, as BoA gathers them (8 × 128 Wikipedia tokens)."""
    model, tokenizer, adapter = first_blocks(1)
    calib = boa.data.calibration_windows(tokenizer, "wikipedia", 8, 128)
    block = adapter.blocks(model)[0]
    with torch.no_grad():
        inputs = BlockInputs.capture(model, [block], calib, torch.float32, with_fp=False)
        needs = boa.BoA(bits=3, group_size=-1).needs()
        group = [adapter.q_proj, adapter.k_proj, adapter.v_proj]
        stats = GroupStatistics(model, adapter, needs, torch.float32)(block, group, inputs.hidden, inputs.kwargs)
    return block, stats


@pytest.mark.smollm2
def test_boa_attention_aware_loss_at_most_gptqs_on_real_block(smollm2_block0_stats):
    """For q, k and v of a real block, BoA's attention-aware loss tr(H_out ΔW H_in ΔWᵀ) is below GPTQ's (solved
    on the shared input Hessian alone)."""
    block, stats = smollm2_block0_stats
    for name, layer_stats in stats.items():
        W = block.get_submodule(name).weight.detach()
        losses = {}
        for method in ("gptq", "boa"):
            solver = method_from_dict({"method": method, "bits": 3, "group_size": -1, "grid": "minmax"})  # same grid
            # GPTQ: the shared input Hessian of q/k/v, no row factor
            solved_on = layer_stats if method == "boa" else boa.stats.LayerStats(stats["self_attn.q_proj"].H)
            q = solver.solve(W.float(), solved_on)
            losses[method] = layer_stats.loss(W, q.dequantize())
        assert losses["boa"] <= losses["gptq"], (name, losses)


@pytest.mark.smollm2
@pytest.mark.parametrize("group_size", [-1, 64])
def test_groupwise_refinement_never_increases_the_loss_on_real_block(smollm2_block0_stats, group_size):
    block, stats = smollm2_block0_stats
    for name, layer_stats in stats.items():
        W = block.get_submodule(name).weight.detach()
        losses = []
        for iters in (0, 1, 2):
            method = boa.TurboBoA(bits=3, group_size=group_size, refine_iters=iters, dx_alpha=0.0)
            losses.append(layer_stats.loss(W, method.solve(W.float(), layer_stats).dequantize()))
        assert losses[1] <= losses[0] * (1 + 1e-6) and losses[2] <= losses[1] * (1 + 1e-6), (name, losses)
        assert losses[1] < losses[0], (name, losses)


@pytest.mark.smollm2
def test_dx_correction_lowers_the_block_output_error_against_fp():
    """Two real blocks at W3: with the dX correction (α = 0.25) the second block's outputs on held-out text are
    closer to the FP model's than without it (same everything else; min-max grids and no refinement keep it quick)."""
    model, tokenizer, adapter = first_blocks(2)
    calib = boa.data.calibration_windows(tokenizer, "wikipedia", 8, 128)
    held = boa.data.eval_tokens(tokenizer, "wikipedia")[0, :512].reshape(4, 128)

    def last_hidden(m):
        with torch.no_grad():
            return m(input_ids=held, use_cache=False, output_hidden_states=True).hidden_states[-1]

    fp = last_hidden(model)
    errors = {}
    for alpha in (0.0, 0.25):
        quantized = copy.deepcopy(model)
        method = boa.TurboBoA(bits=3, group_size=-1, dx_alpha=alpha, grid="minmax", refine_iters=0)
        boa.quantize(quantized, method, calib, adapter=adapter, progress=False)
        errors[alpha] = float(((last_hidden(quantized) - fp) ** 2).mean())
    assert errors[0.25] < errors[0.0], errors


def test_encoder_quantizes_with_turboboa(calib):
    """A BERT-style encoder (bidirectional attention, no RoPE): every layer quantized, outputs closer to FP than
    RTN's."""
    fp_model = build_bert()
    with torch.no_grad():
        fp = fp_model(input_ids=calib).last_hidden_state
    errors = {}
    for method in ("rtn", "turboboa"):
        model = copy.deepcopy(fp_model)
        result = boa.quantize(model, method_from_dict({"method": method, "bits": 3, "group_size": -1}), calib,
                              progress=False)
        assert len(result.layers) == 2 * 6
        with torch.no_grad():
            errors[method] = float(((model(input_ids=calib).last_hidden_state - fp) ** 2).mean())
    assert errors["turboboa"] < errors["rtn"], errors
