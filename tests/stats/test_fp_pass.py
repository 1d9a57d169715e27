"""boa.stats.FPPass: TurboBoA's FP path — kept from its one forward where it fits, else recomputed one batch at a
time from a frozen copy of the block — gives, bit for bit, the statistics and the codes that keeping every layer's
input of every batch gave; recomputing, it runs the copy once per question, and the copy goes when the block is
done."""
import contextlib
import weakref
from operator import attrgetter

import pytest
import torch

import boa
from boa.models import adapter_for
from boa.pipeline import BlockInputs
from boa.pipeline import loop as pipeline_loop
from boa.stats import AttentionRecorder, GroupStatistics, run_fp_block

from conftest import Interrupted, build_llama, build_opt, random_windows, stop_after

BUILDERS = {"llama": build_llama, "opt": build_opt}


class KeptInputs:
    """The FP pass kept whole: one forward of the unquantized block per batch that keeps every linear layer's
    input and the attention call, for every batch at once (what the FP pass did before it recomputed them)."""

    def __init__(self, block, adapter, inputs, kwargs, dtype, attention, out=None, keep_budget=0):
        modules = dict(block.named_modules())
        self.layer_inputs, self.calls = [], []
        self.outputs = [] if out is None else out
        for x, kw in zip(inputs, kwargs):
            seen = {}
            handles = [modules[name].register_forward_pre_hook(
                lambda module, args, name=name: seen.__setitem__(name, args[0].detach().to(dtype)))
                for name in adapter.linear_names()]
            recorder = AttentionRecorder(values=False)
            capturing = (adapter.capturing({"fp": attrgetter(adapter.attention)(block)}, recorder) if attention
                         else contextlib.nullcontext())
            with capturing, torch.no_grad():
                out = block(x.to(next(block.parameters()).dtype), **kw)
            for handle in handles:
                handle.remove()
            self.layer_inputs.append(seen)
            self.calls.append(recorder.kept[0] if attention else None)
            self.outputs.append((out[0] if isinstance(out, tuple) else out).to(dtype))

    def batch(self, i, layers):
        return self.layer_inputs[i], self.calls[i]


def rtn(block, names):
    for name in names:
        layer = block.get_submodule(name)
        layer.weight.copy_(boa.RTN(bits=2).solve(layer.weight, None).dequantize())


@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("true_sequential", [True, False], ids=["sequential", "one-group"])
@pytest.mark.parametrize("keep_budget", [0, None, 1000], ids=["recomputed", "kept", "over-budget"])
def test_statistics_match_keeping_every_layer_input(arch, dtype, true_sequential, keep_budget):
    """Group after group of TurboBoA's statistics (the groups before quantized in between, so the dX terms are not
    zero), or all layers as one group, against every layer input kept up front: the same H, row factors and D, bit
    for bit — whether run_fp_block recomputes them, keeps them from its one forward, or finds them over its budget
    (1000 bytes) and recomputes."""
    model = BUILDERS[arch]()
    adapter = adapter_for(model.config)
    block = adapter.blocks(model)[0]
    groups = adapter.sequential_groups() if true_sequential else [adapter.linear_names()]
    needs = boa.TurboBoA().needs()
    statistics = GroupStatistics(model, adapter, needs, torch.float64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        inputs = BlockInputs.capture(model, [block], random_windows(11, 16, seed=3), dtype, with_fp=True)
        # the quantized path's inputs, as an earlier quantized block leaves them, differ from the FP path's
        inputs.hidden = [x + 0.05 * torch.randn(x.shape, generator=g).to(dtype) for x in inputs.hidden]
        kept = KeptInputs(block, adapter, inputs.fp, inputs.kwargs, dtype, needs.attention)
        fp = run_fp_block(block, adapter, inputs.fp, inputs.kwargs, dtype, needs.attention, keep_budget=keep_budget)
        assert all(torch.equal(a, b) for a, b in zip(fp.outputs, kept.outputs, strict=True))
        assert (fp.kept is not None) == (keep_budget is None)
        seen_d = 0
        for group in groups:
            ours = statistics(block, group, inputs.hidden, inputs.kwargs, fp)
            reference = statistics(block, group, inputs.hidden, inputs.kwargs, kept)
            assert ours.keys() == reference.keys() == set(group)
            for name in group:
                for field in ("H", "H_out", "D"):
                    a, b = getattr(ours[name], field), getattr(reference[name], field)
                    assert (a is None and b is None) or torch.equal(a, b), (group, name, field)
                seen_d += int(torch.count_nonzero(ours[name].D))
            rtn(block, group)
    assert seen_d > 0


def quantize_turboboa(arch, run_fp, monkeypatch):
    """TurboBoA on a tiny model with the FP pass `run_fp` (run_fp_block's signature) in the block loop."""
    monkeypatch.setattr(pipeline_loop, "run_fp_block", run_fp)
    config = boa.QuantConfig(boa.TurboBoA(bits=3, group_size=16), cache_dtype="bfloat16")
    return boa.quantize(BUILDERS[arch](), config, random_windows(12, 16, seed=5), progress=False)


@pytest.mark.parametrize("arch", BUILDERS)
def test_turboboa_codes_match_keeping_every_layer_input(arch, monkeypatch):
    ours = quantize_turboboa(arch, run_fp_block, monkeypatch)
    reference = quantize_turboboa(arch, KeptInputs, monkeypatch)
    assert ours.layers.keys() == reference.layers.keys()
    for name, q in ours.layers.items():
        r = reference.layers[name]
        assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale) and torch.equal(q.zero, r.zero), name


def test_one_run_of_the_copy_per_question():
    """Asking for the same batch and layers twice runs the copy once; only the latest answer is kept. An answer
    holds the layers asked for (one tensor for layers fed the same input) and the attention call only for q/k/v."""
    model = build_llama()
    adapter = adapter_for(model.config)
    block = adapter.blocks(model)[0]
    with torch.no_grad():
        inputs = BlockInputs.capture(model, [block], random_windows(11, 16), torch.float32, with_fp=True)
        fp = run_fp_block(block, adapter, inputs.fp, inputs.kwargs, inputs.dtype, attention=True)
        runs = []
        fp.block.register_forward_pre_hook(lambda module, args: runs.append(1))
        qkv, mlp_in = list(adapter.qkv), list(adapter.mlp_in)
        first, call = fp.batch(0, qkv)
        assert fp.batch(0, qkv)[0] is first and len(runs) == 1
        assert set(first) == set(qkv) and len({x.data_ptr() for x in first.values()}) == 1
        assert call is not None and call[0].shape[0] == 8
        fp.batch(1, qkv)
        fp.batch(0, qkv)
        assert len(runs) == 3
        mlp, call = fp.batch(0, mlp_in)
        assert len(runs) == 4 and set(mlp) == set(mlp_in) and call is None
    assert fp.block is not block
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(fp.block.parameters(), block.parameters()))


def test_the_copy_goes_when_the_block_is_done(monkeypatch):
    """By the time a block's checkpoint is written, its FP pass and with it the frozen copy are gone (freed by
    reference counting, not left to the garbage collector)."""
    copies = []

    def watched(*args, **kwargs):
        fp = run_fp_block(*args, **kwargs)
        copies.append(weakref.ref(fp.block))
        return fp

    def on_block_done(index):
        assert copies[index]() is None, f"block {index}'s FP copy outlived the block"

    monkeypatch.setattr(pipeline_loop, "run_fp_block", watched)
    boa.quantize(build_llama(), boa.TurboBoA(bits=3, group_size=16), random_windows(8, 16), progress=False,
                 on_block_done=on_block_done)
    assert len(copies) == 2


def test_the_fp_path_drops_run_time_quantizers_and_keeps_rotations():
    """A block carrying boa.transforms hooks: the FP copy keeps the online Hadamard (part of the rotated float
    model) and drops the activation quantizers (lossy), so its outputs are the rotated float model's."""
    from boa.transforms import ActivationQuant, QuaRot

    model = build_llama()
    adapter = adapter_for(model.config)
    QuaRot().apply(model, adapter)
    block = adapter.blocks(model)[0]
    with torch.no_grad():
        inputs = BlockInputs.capture(model, [block], random_windows(4, 16), torch.float32, with_fp=True)
        float_path = run_fp_block(block, adapter, inputs.fp, inputs.kwargs, inputs.dtype, attention=False).outputs
        ActivationQuant(4).attach(model, adapter)
        fp = run_fp_block(block, adapter, inputs.fp, inputs.kwargs, inputs.dtype, attention=False)
    assert all(torch.equal(a, b) for a, b in zip(fp.outputs, float_path))
    assert len(fp.block.get_submodule(adapter.mlp_out)._forward_pre_hooks) == 1   # the Hadamard
    assert len(block.get_submodule(adapter.mlp_out)._forward_pre_hooks) == 2      # the block keeps both
    assert not fp.block.get_submodule(adapter.q_proj)._forward_pre_hooks


def test_dx_windows_runs_the_fp_path_on_the_first_batches_and_resumes(monkeypatch, tmp_path):
    """TurboBoA on 12 windows (forward batches of 8 and 4): dx_windows = 12 or more is the default run bit for bit;
    dx_windows = 4 runs the FP path on the first batch only, in every block, and changes the codes; such a run
    interrupted after block 0 resumes (the FP path's one batch back from the checkpoint) to the same codes."""
    fp_batches = []

    def watched(block, adapter, inputs, *args, **kwargs):
        fp_batches.append(len(inputs))
        return run_fp_block(block, adapter, inputs, *args, **kwargs)

    monkeypatch.setattr(pipeline_loop, "run_fp_block", watched)
    calib = random_windows(12, 16, seed=5)

    def run(dx_windows, **kwargs):
        return boa.quantize(build_llama(), boa.TurboBoA(bits=3, group_size=16, dx_windows=dx_windows), calib,
                            progress=False, **kwargs).layers

    default = run(0)
    assert fp_batches == [2, 2]
    for dx_windows in (12, 16):
        assert all(torch.equal(q.codes, default[n].codes) and torch.equal(q.scale, default[n].scale)
                   for n, q in run(dx_windows).items())
    fp_batches.clear()
    subset = run(4)
    assert fp_batches == [1, 1]
    assert any(not torch.equal(q.codes, default[n].codes) for n, q in subset.items())

    with pytest.raises(Interrupted):
        run(4, checkpoint_dir=tmp_path / "ckpt", on_block_done=stop_after(0))
    resumed = run(4, checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert all(torch.equal(q.codes, subset[n].codes) and torch.equal(q.scale, subset[n].scale)
               for n, q in resumed.items())
