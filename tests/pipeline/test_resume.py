"""The pipeline's checkpoint (boa.core.checkpoint in the run's folder): an interrupted run resumes from its last
finished block and ends bit-identical to an uninterrupted one; a checkpoint of another run is refused; with out= the
checkpoint is OUT.partial, discarded by a fresh run and removed by boa.save. The CLI's --resume:
tests/cli/test_cli_quantize.py."""
import copy
import json

import pytest
import torch

import boa
from boa.algorithms import method_from_dict

from conftest import Interrupted, build_llama, random_windows, stop_after

CONFIG = dict(method="gptq", bits=4, group_size=32, act_order=True)


def assert_same_result(a, b, model_a, model_b):
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        for field in ("codes", "scale", "zero", "g_idx"):
            assert torch.equal(getattr(a.layers[name], field), getattr(b.layers[name], field)), (name, field)
    assert a.losses == b.losses
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.fixture
def four_blocks(make_llama):
    return make_llama(num_layers=4)


TURBOBOA = dict(method="turboboa", bits=3, group_size=32, rows_per_step=4)
AESPA = dict(method="aespa", bits=2, group_size=32, rows_per_step=4, rounding_iters=20)


def count_solves(monkeypatch, method) -> list:
    """Counts the method's layer solves (its class's solve is wrapped)."""
    solved = []
    real_solve = type(method).solve

    def spy(self, W, stats, **kwargs):
        solved.append(1)
        return real_solve(self, W, stats, **kwargs)

    monkeypatch.setattr(type(method), "solve", spy)
    return solved


@pytest.mark.parametrize("settings", [CONFIG, TURBOBOA, AESPA], ids=["gptq", "turboboa", "aespa"])
def test_resume_after_interruption_is_bit_identical(four_blocks, calib, tmp_path, monkeypatch, settings):
    """Interrupted after block 1, the checkpoint says 'next step 2' and holds blocks 0 and 1 and block 2's inputs
    (one carry); resuming on a fresh copy of the same model restores blocks 0-1 from their codes, quantizes only
    blocks 2-3 (on_block_done fires for 2 and 3 only), and ends with weights, codes, grids and losses equal to a run
    that was never interrupted. TurboBoA's dX correction also needs the FP path's inputs back from the checkpoint."""
    config = method_from_dict(settings)
    reference_model = copy.deepcopy(four_blocks)
    reference = boa.quantize(reference_model, config, calib, progress=False)

    checkpoint = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        boa.quantize(copy.deepcopy(four_blocks), config, calib, checkpoint_dir=checkpoint, progress=False,
                     on_block_done=stop_after(1))
    progress = json.loads((checkpoint / "progress.json").read_text())
    assert progress["next_step"] == 2 and progress["carry"] == "carry-0001.safetensors"
    assert progress["fingerprint"] == reference.fingerprint
    assert sorted(p.name for p in checkpoint.glob("step-*")) == ["step-0000.safetensors", "step-0001.safetensors"]
    assert sorted(p.name for p in checkpoint.glob("carry-*")) == ["carry-0001.safetensors"]

    done = []
    solved = count_solves(monkeypatch, config)
    resumed_model = copy.deepcopy(four_blocks)
    resumed = boa.quantize(resumed_model, config, calib, checkpoint_dir=checkpoint, resume=True, progress=False,
                           on_block_done=done.append)
    assert done == [2, 3]
    assert len(solved) == 2 * 7  # two blocks of seven projections, not four
    assert resumed.fingerprint == reference.fingerprint
    assert_same_result(resumed, reference, resumed_model, reference_model)


def test_without_resume_a_checkpoint_is_ignored(four_blocks, calib, tmp_path):
    """resume=False starts over even though a checkpoint exists: every block is quantized again."""
    config = method_from_dict(CONFIG)
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        boa.quantize(copy.deepcopy(four_blocks), config, calib, checkpoint_dir=checkpoint, progress=False,
                     on_block_done=stop_after(1))
    done = []
    boa.quantize(four_blocks, config, calib, checkpoint_dir=checkpoint, progress=False, on_block_done=done.append)
    assert done == [0, 1, 2, 3]


@pytest.mark.parametrize("change", ["bits", "calib"])
def test_resume_refuses_a_checkpoint_of_another_run(four_blocks, calib, tmp_path, change):
    """A checkpoint written with other settings (bits) or other calibration windows cannot be resumed: BoaError
    names the checkpoint folder, and the model is left unquantized."""
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        boa.quantize(copy.deepcopy(four_blocks), method_from_dict(CONFIG), calib, checkpoint_dir=checkpoint,
                     progress=False, on_block_done=stop_after(1))
    config = method_from_dict({**CONFIG, "bits": 3}) if change == "bits" else method_from_dict(CONFIG)
    windows = calib if change == "bits" else calib.flip(0)
    before = copy.deepcopy(four_blocks.state_dict())
    with pytest.raises(boa.BoaError, match="belongs to a different run") as err:
        boa.quantize(four_blocks, config, windows, checkpoint_dir=checkpoint, resume=True, progress=False)
    assert str(checkpoint) in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in four_blocks.state_dict().items())


def test_resume_refuses_a_checkpoint_of_a_permuted_model(four_blocks, calib, tmp_path):
    """A model that differs only by two swapped weight rows is another model: its checkpoint must not be resumed."""
    twin = copy.deepcopy(four_blocks)
    with torch.no_grad():
        w = twin.model.layers[0].self_attn.q_proj.weight
        w[[0, 1]] = w[[1, 0]].clone()
    config = method_from_dict(CONFIG)
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        boa.quantize(twin, config, calib, checkpoint_dir=checkpoint, progress=False, on_block_done=stop_after(1))
    with pytest.raises(boa.BoaError, match="different run"):
        boa.quantize(four_blocks, config, calib, checkpoint_dir=checkpoint, resume=True, progress=False)


def test_with_out_the_checkpoint_is_out_partial(four_blocks, calib, tmp_path, word_tokenizer):
    """quantize(out=OUT) keeps its checkpoint in OUT.partial: a plain fresh run refuses to throw an earlier one
    away, restart=True discards it and quantizes every block, resume=True continues from it, and boa.save removes it
    after writing OUT."""
    config = method_from_dict(CONFIG)
    out = tmp_path / "OUT"
    partial = tmp_path / "OUT.partial"
    reference_model = copy.deepcopy(four_blocks)
    reference = boa.quantize(reference_model, config, calib, progress=False)

    with pytest.raises(Interrupted):
        boa.quantize(copy.deepcopy(four_blocks), config, calib, out=out, progress=False, on_block_done=stop_after(1))
    assert json.loads((partial / "progress.json").read_text())["next_step"] == 2 and not out.exists()
    with pytest.raises(boa.BoaError, match="2 finished steps.*--resume.*--restart"):
        boa.quantize(copy.deepcopy(four_blocks), config, calib, out=out, progress=False)
    done = []
    with pytest.raises(Interrupted):
        boa.quantize(copy.deepcopy(four_blocks), config, calib, out=out, restart=True, progress=False,
                     on_block_done=lambda i: done.append(i) or stop_after(0)(i))
    assert done == [0]  # started over
    assert json.loads((partial / "progress.json").read_text())["next_step"] == 1

    done = []
    resumed_model = copy.deepcopy(four_blocks)
    resumed = boa.quantize(resumed_model, config, calib, out=out, resume=True, progress=False,
                           on_block_done=done.append)
    assert done == [1, 2, 3]
    assert_same_result(resumed, reference, resumed_model, reference_model)
    assert partial.exists()
    boa.save(resumed, out, word_tokenizer)
    assert not partial.exists() and (out / "quantization.json").exists()


def test_out_holding_another_model_is_refused_before_any_work(four_blocks, calib, occupied_out, folder_snapshot):
    before_model = copy.deepcopy(four_blocks.state_dict())
    before = folder_snapshot(occupied_out)
    with pytest.raises(boa.BoaError, match="already holds a different model"):
        boa.quantize(four_blocks, method_from_dict(CONFIG), calib, out=occupied_out, progress=False)
    assert folder_snapshot(occupied_out) == before
    assert not occupied_out.with_name("occupied.partial").exists()
    assert all(torch.equal(v, before_model[k]) for k, v in four_blocks.state_dict().items())


def test_resume_needs_a_checkpoint_folder(four_blocks, calib):
    with pytest.raises(boa.BoaError, match="resume=True needs the output folder"):
        boa.quantize(four_blocks, method_from_dict(CONFIG), calib, resume=True, progress=False)


class Fault(Exception):
    pass


@pytest.fixture(scope="module")
def turboboa_reference():
    """An uninterrupted TurboBoA run on the 4-block Llama (the same model and windows as four_blocks and calib)."""
    model = build_llama(num_layers=4)
    return boa.quantize(model, method_from_dict(TURBOBOA), random_windows(8, 32, seed=0), progress=False), model


@pytest.mark.parametrize("fault", ["writing the step", "writing the carry", "writing progress.json",
                                   "removing the old carry"])
def test_a_fault_at_any_write_of_a_checkpoint_resumes_bit_identically(four_blocks, calib, tmp_path, monkeypatch,
                                                                       turboboa_reference, fault):
    """TurboBoA (FP-path inputs in the carry too): block 2's checkpoint save fails at one of its writes, leaving
    whatever that write left (a half-written temporary, a new step file with the old progress record, ...); a
    resumed run on a fresh copy ends equal to an uninterrupted one."""
    import boa.core.checkpoint as checkpoint_module

    config = method_from_dict(TURBOBOA)
    reference, reference_model = turboboa_reference
    real_save_file, real_write_json = checkpoint_module.save_file, checkpoint_module.write_json
    saves = []

    def failing_save_file(tensors, path, metadata=None):
        saves.append(path)
        what = "writing the step" if "step-0002" in path else "writing the carry" if "carry-0002" in path else None
        if what == fault:
            with open(path, "wb") as f:  # half a file, as a kill mid-write leaves it
                f.write(b"\0" * 100)
            raise Fault
        real_save_file(tensors, path, metadata=metadata)

    def failing_write_json(path, data):
        if fault == "writing progress.json" and data.get("next_step") == 3:
            raise Fault
        real_write_json(path, data)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save_file)
    monkeypatch.setattr(checkpoint_module, "write_json", failing_write_json)
    if fault == "removing the old carry":
        from pathlib import Path

        real_unlink = Path.unlink

        def failing_unlink(self, *args, **kwargs):
            if self.name == "carry-0001.safetensors":
                raise Fault
            return real_unlink(self, *args, **kwargs)

        monkeypatch.setattr(Path, "unlink", failing_unlink)
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(Fault):
        boa.quantize(copy.deepcopy(four_blocks), config, calib, checkpoint_dir=checkpoint, progress=False)
    monkeypatch.undo()

    resumed_model = copy.deepcopy(four_blocks)
    resumed = boa.quantize(resumed_model, config, calib, checkpoint_dir=checkpoint, resume=True, progress=False)
    assert_same_result(resumed, reference, resumed_model, reference_model)
    assert sorted(p.name for p in checkpoint.glob("carry-*")) == ["carry-0003.safetensors"]
