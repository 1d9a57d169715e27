"""Mixed precision to a size budget (boa.pipeline.mixed): the knapsack against brute force, the measured losses against
a direct recomputation, and a planned run whose saved tensors meet the budget exactly as counted from the files."""
import itertools
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from transformers import AutoModelForCausalLM

import boa
from boa.config import QuantConfig
from boa.core.errors import BoaError
from boa.export import export_compressed_tensors
from boa.pipeline.mixed import (allocate, measure_widths, mixed_precision, parse_widths, plan_widths, run_units,
                                sensitivity_method, serving_groups)
from boa.stats import LayerStats

from conftest import build_llama, build_phi3
from test_pipeline_gptq_rtn import fp_hessians, logits


def brute_force(options, budget):
    names = list(options)
    best = None
    for picks in itertools.product(*(range(len(options[n])) for n in names)):
        size = sum(options[n][j][0] for n, j in zip(names, picks))
        loss = sum(options[n][j][1] for n, j in zip(names, picks))
        if size <= budget and (best is None or loss < best):
            best = loss
    return best


@pytest.mark.parametrize("seed", range(20))
def test_allocate_is_the_brute_force_optimum(seed):
    """Random problems of 3 to 6 layers with 2 to 4 widths each (bigger widths lose less, as measured ones do):
    the allocation fits the budget and its loss is the brute-force minimum."""
    rng = random.Random(seed)
    options = {}
    for unit in range(rng.randint(3, 6)):
        sizes = sorted(rng.sample(range(5, 60), rng.randint(2, 4)))
        losses = sorted((rng.uniform(0, 10) for _ in sizes), reverse=True)
        options[f"layer{unit}"] = list(zip(sizes, losses))
    smallest = sum(o[0][0] for o in options.values())
    largest = sum(o[-1][0] for o in options.values())
    budget = rng.randint(smallest, largest)
    chosen = allocate(options, budget)
    assert sum(options[n][j][0] for n, j in chosen.items()) <= budget
    assert sum(options[n][j][1] for n, j in chosen.items()) == pytest.approx(brute_force(options, budget))


def test_allocate_in_coarse_units_never_exceeds_the_budget():
    """With units of many bytes (budget far above the resolution) the sizes are rounded up: the plan still fits, and
    it is within one unit a layer of the optimum's loss ordering (here: it loses no more than the exact plan of a
    budget short by that slack)."""
    rng = random.Random(0)
    options = {f"l{i}": [(rng.randint(900, 1100) * k, 10.0 / k ** 2) for k in (2, 3, 4)] for i in range(6)}
    budget = 17_000
    coarse = allocate(options, budget, resolution=50)  # units of 340 bytes
    size = sum(options[n][j][0] for n, j in coarse.items())
    assert size <= budget
    slack = 6 * 340
    exact_short = brute_force(options, budget - slack)
    assert sum(options[n][j][1] for n, j in coarse.items()) <= exact_short


def test_allocate_refuses_a_budget_below_the_narrowest_widths():
    with pytest.raises(BoaError, match="below 20.*--target-bits"):
        allocate({"a": [(10, 1.0), (20, 0.5)], "b": [(10, 1.0)]}, 19)


def test_parse_widths():
    assert parse_widths("2g64, 3,3G128,4") == ((2, 64), (3, -1), (3, 128), (4, -1))
    for bad in ("3,3", "x", "3gx", ""):
        with pytest.raises(BoaError, match="width"):
            parse_widths(bad)


def test_config_widths_pick_each_layers_method_and_round_trip():
    method = boa.TurboBoA(bits=3, group_size=128)
    config = QuantConfig(method, widths={"model.layers.0.mlp.down_proj": (4, -1)})
    assert config.method_for("model.layers.0.mlp.down_proj") == boa.TurboBoA(bits=4, group_size=-1)
    assert config.method_for("model.layers.0.mlp.up_proj") is method
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert "widths" not in QuantConfig(method).to_dict()  # earlier runs' fingerprints stay what they were
    assert config.fingerprint() != QuantConfig(method).fingerprint()
    aespa = QuantConfig(boa.Aespa(), widths={"x": (2, 64)}).method_for("x")
    assert (aespa.init.bits, aespa.init.group_size, aespa.bits) == (2, 64, 2)
    with pytest.raises(BoaError, match="bits=5"):
        QuantConfig(method, widths={"x": (5, 128)})
    with pytest.raises(BoaError, match="GGUF type"):
        QuantConfig(boa.GPTQ(gguf="Q4_0"), widths={"x": (3, 128)})


def test_sensitivity_method_drops_the_attention_terms():
    proxy = sensitivity_method(boa.TurboBoA(bits=3, group_size=64, act_order=True, percdamp=0.05))
    # TurboBoA's grid and groups carried over (its default act-order meets groups: static)
    assert proxy == boa.GPTQ(bits=3, group_size=64, act_order=True, percdamp=0.05, grid="hessian-fast",
                             static_groups=True)
    assert sensitivity_method(boa.Aespa()) == sensitivity_method(boa.TurboBoA())
    assert sensitivity_method(boa.RTN(bits=2)) == boa.RTN(bits=2)


def test_measured_losses_are_each_layers_gptq_objective(make_llama, calib):
    """Block 0's layers are measured on the float model's inputs: each loss is tr(ΔW H ΔWᵀ) of GPTQ at that width
    with H from a plain forward hook (an independent recomputation), the bytes are those boa.save writes, and the
    model is left unchanged."""
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    widths = ((2, 32), (4, -1))
    measured = measure_widths(model, calib, boa.GPTQ(bits=3), widths, probe_windows=0, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    names = [f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
    hessians = fp_hessians(model, calib, names)
    for name in names:
        W = model.get_submodule(name).weight.detach()
        for bits, group in widths:
            q = boa.GPTQ(bits=bits, group_size=group).solve(W, LayerStats(hessians[name].float()))
            dW = (q.dequantize() - W).double()
            expected = float(torch.trace(dW @ hessians[name] @ dW.T))
            assert measured.objective[name][name][(bits, group)] == pytest.approx(expected, rel=1e-3)
            out, n = W.shape
            groups = 1 if group == -1 else n // group
            tiles = lambda count: -(-count // 64) * 64  # noqa: E731
            # codes b bits each in tiles of 64 columns, float32 scales (a float32 model's grids are no 16-bit
            # floats), zero points b bits each, packed as one row
            codes, scales, zeros = out * tiles(n) * bits // 8, out * groups * 4, tiles(out * groups) * bits // 8
            assert measured.nbytes[name][(bits, group)] == codes + scales + zeros
        assert measured.numel[name] == W.numel()
    assert len(measured.numel) == 14  # 2 blocks × 7 layers


def test_response_is_the_models_kl_around_the_operating_point(make_llama, calib):
    """With every layer at the probe width (the method's: 4-bit per channel), the model's KL from the float model on
    the probe windows, and with one layer restored to its float weight or at the narrowest width (2-bit g32): each
    layer's response points, recomputed here from whole-model forwards with the weights swapped (RTN: the same
    codes), and the loss interpolated between them."""
    model = make_llama()
    widths = ((2, 32), (3, -1), (4, -1))
    measured = measure_widths(model, calib, boa.RTN(bits=4, group_size=-1), widths, probe_windows=2,
                              progress=False)
    names = sorted(measured.response)
    W = {n: model.get_submodule(n).weight.data for n in names}
    Q = {w: {n: boa.RTN(bits=w[0], group_size=w[1]).solve(W[n], None).dequantize() for n in names}
         for w in ((4, -1), (2, 32))}
    probe = calib[:2]
    reference = torch.log_softmax(logits(model, probe), dim=-1)

    def kl(weights):
        for n in names:
            model.get_submodule(n).weight.data = weights[n]
        try:
            log_q = torch.log_softmax(logits(model, probe), dim=-1)
        finally:
            for n in names:
                model.get_submodule(n).weight.data = W[n]
        return float((reference.exp() * (reference - log_q)).sum() / probe.numel())

    base = kl(Q[4, -1])
    for n in names:
        objective = measured.objective[n][n]
        restored, narrow = kl({**Q[4, -1], n: W[n]}), kl({**Q[4, -1], n: Q[2, 32][n]})
        expected = sorted([(0.0, restored), (objective[4, -1], base), (objective[2, 32], narrow)])
        got = measured.response[n]
        assert [x for x, _ in got] == [x for x, _ in expected]
        for (_, y), top in zip(got, itertools.accumulate([y for _, y in expected], max)):
            assert y == pytest.approx(top, rel=1e-4, abs=1e-7)  # made non-decreasing
        (x0, y0), (x1, y1) = got[1:]
        assert measured.loss(n, (3, -1)) == pytest.approx(y0 + (y1 - y0) * (objective[3, -1] - x0) / (x1 - x0))
    assert measured.loss(names[0], (4, -1)) == pytest.approx(max(base, measured.response[names[0]][0][1]))


def test_planned_run_meets_the_budget_in_the_saved_files(make_llama, calib, heldout, tmp_path):
    """--target-bits end to end: the budget holds as counted from the saved tensors of the quantized layers (codes,
    scales, zeros), the stored bits equal the plan's, each layer is saved at its planned width, the widths are
    mixed, and the folder loads to the same logits; a second plan for another budget reads the measurement cache."""
    model = make_llama()
    config = QuantConfig(boa.GPTQ(bits=3, group_size=32))
    cache = tmp_path / "cache"
    target = 3.6  # 2g32 takes about 3.07 bits a weight here, 3-bit per channel 3.55 (float32 scales)
    mixed = mixed_precision(model, calib, config, target, ((2, 32), (3, -1), (3, 32), (4, -1)), cache=cache,
                            progress=False)
    assert len(set(mixed.chosen.values())) > 1
    result = boa.quantize(model, mixed.config, calib, progress=False)
    boa.save(result, tmp_path / "out")
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    manifest = json.loads((tmp_path / "out" / "quantization.json").read_text())
    stored = numel = 0
    for name, (bits, group) in mixed.chosen.items():
        layer = model.get_submodule(name)
        numel += layer.weight.numel()
        stored += sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(name + "."))
        saved = manifest["layers"][name]
        assert (saved["bits"], saved["group_size"]) == (bits, layer.in_features if group == -1 else group)
    assert 8 * stored / numel == pytest.approx(mixed.bits, abs=1e-12)
    assert 8 * stored <= target * numel
    loaded, _, loaded_config = boa.load(tmp_path / "out")
    assert loaded_config == mixed.config
    assert torch.equal(logits(loaded, heldout), logits(model, heldout))
    with pytest.raises(BoaError, match="schemes .* with zero points.*--sym.*--format gptq"):
        export_compressed_tensors(model, result.layers, tmp_path / "ct")  # transformers would misread them

    again = mixed_precision(make_llama(), calib, config, 4.0, ((2, 32), (3, -1), (3, 32), (4, -1)), cache=cache,
                            progress=False)
    assert again.bits <= 4.0 and again.bits > mixed.bits
    assert len(list(cache.iterdir())) == 1


def test_symmetric_mixed_widths_export_to_compressed_tensors(make_llama, calib, heldout, tmp_path):
    """Symmetric grids at several widths: one config group per width, and transformers loads the export with the
    fake-quantized model's logits."""
    model = make_llama()
    mixed = mixed_precision(model, calib, QuantConfig(boa.GPTQ(bits=3, group_size=32, sym=True)), 3.6,
                            ((2, 32), (3, -1), (4, -1)), progress=False)
    result = boa.quantize(model, mixed.config, calib, progress=False)
    out = export_compressed_tensors(model, result.layers, tmp_path / "ct")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == len(set(mixed.chosen.values())) > 1
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), heldout), logits(model, heldout))


def test_fused_projections_share_one_width(calib):
    """Phi-3's qkv_proj and gate_up_proj are quantized part by part but stored as one matrix: each gets one width."""
    model = build_phi3()
    mixed = mixed_precision(model, calib, QuantConfig(boa.GPTQ(bits=3, group_size=32)), 3.5,
                            ((2, 32), (3, -1), (4, -1)), progress=False)
    units = run_units(model)
    assert "model.layers.0.self_attn.qkv_proj" in mixed.chosen
    for unit, parts in units.items():
        assert len({mixed.config.method_for(p).bits for p in parts}) == 1
    result = boa.quantize(model, mixed.config, calib, progress=False)
    for unit, width in mixed.chosen.items():
        assert result.layers[unit].bits == width[0]


def test_serving_groups_tie_what_vllm_fuses():
    from conftest import build_mixtral, build_phi3

    llama = serving_groups(build_llama())
    block = "model.layers.1."
    assert [block + n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")] in llama
    assert [block + n for n in ("mlp.gate_proj", "mlp.up_proj")] in llama
    assert [block + "self_attn.o_proj"] in llama and [block + "mlp.down_proj"] in llama and len(llama) == 8
    phi3 = serving_groups(build_phi3())
    assert [block + "self_attn.qkv_proj"] in phi3 and [block + "mlp.gate_up_proj"] in phi3 and len(phi3) == 8
    mixtral = serving_groups(build_mixtral())
    experts = next(g for g in mixtral if any(".experts." in n for n in g))
    assert len(experts) == 3 * build_mixtral().config.num_local_experts  # gate, up, down of every expert
    assert len(mixtral) == 6


def test_tied_plans_give_fused_layers_one_width(make_llama, calib):
    model = make_llama()
    widths = ((2, 32), (3, -1), (4, -1))
    tied = mixed_precision(model, calib, QuantConfig(boa.GPTQ(bits=3, group_size=32)), 3.5, widths, progress=False)
    for group in serving_groups(model):
        assert len({tied.chosen[n] for n in group}) == 1
    assert tied.bits <= 3.5


def test_plan_refuses_transforms_and_bad_targets(make_llama, calib):
    from boa.transforms import QuaRot

    with pytest.raises(BoaError, match="transforms"):
        mixed_precision(make_llama(), calib, QuantConfig(boa.GPTQ(), transforms=(QuaRot(),)), 3.0, progress=False)
    measured = measure_widths(make_llama(), calib, boa.GPTQ(), ((2, 32), (4, 32)), progress=False)
    with pytest.raises(BoaError, match="target_bits"):
        plan_widths(measured, -1)
    with pytest.raises(BoaError, match=r"below 3\.06\d\d bits a weight.*--widths"):  # 2-bit g32: a float32 scale
        plan_widths(measured, 3.0)                                              # and 2-bit zero a 32
