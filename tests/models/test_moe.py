"""Mixture-of-experts blocks (boa.models.experts; Mixtral, Qwen3-MoE): experts unfused for the run compute what the
fused module does, each expert's Hessian comes from exactly the tokens routed to it, an expert the calibration
never reaches gets the pooled Hessian (never left float), and the quantized model saves and loads."""
import pytest
import torch

import boa
from boa.core.hessian import HessianAccumulator
from boa.models.experts import UnfusedExperts
from boa.stats.collect import collect_statistics
from boa.stats.group import MIN_EXPERT_TOKENS, pool_starved_experts
from conftest import build_mixtral, build_qwen3_moe, random_windows

FAMILIES = {"mixtral": build_mixtral, "qwen3_moe": build_qwen3_moe}


@pytest.mark.parametrize("build", FAMILIES.values(), ids=FAMILIES.keys())
def test_unfused_experts_hold_the_fused_weights_and_compute_the_same(build):
    model = build()
    adapter = boa.models.adapter_for(model.config)
    ids = random_windows(2, 16)
    fused = model.model.layers[1].mlp.experts
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    inter = gate_up.shape[1] // 2
    with torch.no_grad():
        expected = model(ids).logits
        adapter.split(model)
        experts = model.model.layers[1].mlp.experts
        assert isinstance(experts, UnfusedExperts) and len(experts) == 4
        for e, expert in enumerate(experts):
            assert torch.equal(expert.gate_proj.weight, gate_up[e, :inter])
            assert torch.equal(expert.up_proj.weight, gate_up[e, inter:])
            assert torch.equal(expert.down_proj.weight, down[e])
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert experts.tokens.sum() == 2 * 16 * 2  # every token routed to its top 2
    assert not any("gate_up_proj" in n for n, _ in model.named_parameters())  # the fused copy is gone


def test_each_experts_hessian_is_that_of_the_tokens_routed_to_it():
    model = build_mixtral()
    adapter = boa.models.adapter_for(model.config)
    adapter.split(model)
    block = model.model.layers[0]
    seen = []
    block.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, 64).double()))
    ids = random_windows(3, 16)
    captured = {}
    model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kw: captured.update(x=args[0] if args else kw["hidden_states"], kw=kw), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    kw = {k: v for k, v in captured["kw"].items() if k not in ("hidden_states", "past_key_values")}
    seen.clear()
    with torch.no_grad():
        hessians = collect_statistics(block, list(adapter.mlp_in), [captured["x"]], [kw], torch.float64,
                                      adapter=adapter)
    x = seen[0]
    _, _, chosen = block.mlp.gate(x.float())
    for e in range(4):
        routed = x[(chosen == e).any(-1)]
        acc = hessians[f"mlp.experts.{e}.gate_proj"]
        assert acc is hessians[f"mlp.experts.{e}.up_proj"] and acc.n == routed.shape[0] > 0
        torch.testing.assert_close(acc.H, 2 * routed.T @ routed / routed.shape[0])


def test_starved_experts_get_the_pooled_hessian():
    def acc(rows, seed):
        a = HessianAccumulator(8, torch.float64)
        a.add(torch.randn(rows, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        return a

    fed = {"x.0.gate": acc(300, 0), "x.1.gate": acc(MIN_EXPERT_TOKENS - 1, 1)}
    group = ["x.0.gate", "x.1.gate", "x.2.gate"]
    stats = {n: boa.stats.LayerStats(a.H) for n, a in fed.items()}
    tokens = pool_starved_experts(stats, fed, group, "x")
    assert tokens == {"x.0.gate": 300, "x.1.gate": MIN_EXPERT_TOKENS - 1, "x.2.gate": 0}
    pooled = (fed["x.0.gate"].H * 300 + fed["x.1.gate"].H * (MIN_EXPERT_TOKENS - 1)) / (300 + MIN_EXPERT_TOKENS - 1)
    assert stats["x.0.gate"].H is fed["x.0.gate"].H
    torch.testing.assert_close(stats["x.1.gate"].H, pooled)
    assert stats["x.2.gate"] is stats["x.1.gate"]


def never_expert_3(router):
    """The router's forward (Mixtral's and Qwen3-MoE's: softmax, top-k, renormalised where they do) with expert 3's
    logit at −∞."""
    def forward(hidden):
        logits = torch.nn.functional.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
        logits[:, 3] = float("-inf")
        top, index = logits.float().softmax(-1).topk(router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):
            top = top / top.sum(-1, keepdim=True)
        return logits, top.to(logits.dtype), index

    return forward


@pytest.mark.parametrize("build", FAMILIES.values(), ids=FAMILIES.keys())
def test_every_expert_is_quantized_even_one_no_token_reaches(build, tmp_path, monkeypatch):
    model, reference = build(), build()
    routers = [layer.mlp.gate for layer in model.model.layers]
    for router in routers:  # during calibration the routers never pick expert 3
        router.forward = never_expert_3(router)
    result = boa.quantize(model, boa.GPTQ(bits=4, group_size=16), random_windows(8, 32), progress=False)
    for router in routers:
        del router.forward
    adapter = boa.models.adapter_for(model.config)
    expert_layers = [f"model.layers.{i}.{n}" for i in range(2) for n in adapter.linear_names() if ".experts." in n]
    assert len(expert_layers) == 2 * 4 * 3 and set(expert_layers) <= set(result.layers)
    assert [result.expert_tokens[f"model.layers.{i}.mlp.experts.3.gate_proj"] for i in range(2)] == [0, 0]
    assert all(result.expert_tokens[f"model.layers.0.mlp.experts.{e}.gate_proj"] > 0 for e in range(3))
    for i in range(2):  # expert 3 was quantized (its weights are on a 4-bit grid now), not left float
        q = result.layers[f"model.layers.{i}.mlp.experts.3.down_proj"]
        weight = model.model.layers[i].mlp.experts[3].down_proj.weight
        assert torch.equal(weight, q.dequantize().to(weight.dtype))
        assert not torch.equal(weight, reference.model.layers[i].mlp.experts.down_proj[3])
    ids = random_windows(2, 16, seed=1)
    loaded, _, _ = boa.load(boa.save(result, tmp_path / "q"))
    monkeypatch.setenv("BOA_KERNELS", "torch")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_forced_routing_feeds_every_expert_every_token_and_computes_the_same():
    """The reference mode for starved experts (GPTQ with calibration forced through every expert): each expert's
    layers see all tokens, the block's output is still the routed one."""
    model = build_mixtral()
    boa.models.adapter_for(model.config).split(model)
    ids = random_windows(2, 16)
    with torch.no_grad():
        expected = model(ids).logits
        seen = []
        for experts in (layer.mlp.experts for layer in model.model.layers):
            experts.forced = True
            for expert in experts:
                expert.gate_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert seen == [2 * 16] * (2 * 4)


def test_moe_with_8_bit_activations_rounds_every_experts_inputs_in_memory_and_packed(tmp_path):
    """--a-bits 8 on Mixtral: every quantized layer, each expert's included, reads its input rounded per token (one
    pre-hook each after the run), and the packed model (int8 kernels) computes the same logits."""
    from boa.transforms import ActivationQuant
    from boa.transforms.activations import _QuantizeInputs

    model = build_mixtral()
    config = boa.QuantConfig(boa.GPTQ(bits=4, group_size=16), transforms=(ActivationQuant(8),))
    result = boa.quantize(model, config, random_windows(8, 32), progress=False)
    hooked = {name for name, m in model.named_modules()
              if any(isinstance(h, _QuantizeInputs) for h in m._forward_pre_hooks.values())}
    assert hooked == set(result.layers)
    ids = random_windows(2, 16, seed=1)
    loaded, _, _ = boa.load(boa.save(result, tmp_path / "q"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
