"""Checkpoints: an interrupted run resumes from its last finished block and ends bit-identical to an uninterrupted
one; a checkpoint of another run is refused. And the `boa quantize` CLI end to end on a tiny model folder."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import boa
import boa.pipeline
from boa.cli import main

CONFIG = dict(method="gptq", bits=4, group_size=32, act_order=True)


class Interrupted(Exception):
    pass


def stop_after(index):
    def on_block_done(i):
        if i == index:
            raise Interrupted

    return on_block_done


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


@pytest.mark.parametrize("settings", [CONFIG, TURBOBOA, AESPA], ids=["gptq", "turboboa", "aespa"])
def test_resume_after_interruption_is_bit_identical(four_blocks, calib, tmp_path, monkeypatch, settings):
    """Interrupted after block 1, the checkpoint says 'next block 2'; resuming on a fresh copy of the same model
    restores blocks 0-1 from their codes, quantizes only blocks 2-3 (on_block_done fires for 2 and 3 only), and
    ends with weights, codes, grids and losses equal to a run that was never interrupted. TurboBoA's dX correction
    also needs the FP path's inputs back from the checkpoint."""
    config = boa.QuantConfig(**settings)
    reference_model = copy.deepcopy(four_blocks)
    reference = boa.quantize(reference_model, config, calib, progress=False)

    checkpoint = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        boa.quantize(copy.deepcopy(four_blocks), config, calib, checkpoint_dir=checkpoint, progress=False,
                     on_block_done=stop_after(1))
    assert json.loads((checkpoint / "progress.json").read_text())["next_block"] == 2
    assert sorted(p.name for p in checkpoint.glob("block_*")) == ["block_0000.safetensors", "block_0001.safetensors"]

    done, solved = [], []
    real_solve = boa.pipeline.solve_layer
    monkeypatch.setattr(boa.pipeline, "solve_layer", lambda W, H, cfg, **kw: solved.append(1) or real_solve(W, H, cfg, **kw))
    resumed_model = copy.deepcopy(four_blocks)
    resumed = boa.quantize(resumed_model, config, calib, checkpoint_dir=checkpoint, resume=True, progress=False,
                           on_block_done=done.append)
    assert done == [2, 3]
    assert len(solved) == 2 * 7  # two blocks of seven projections, not four
    assert resumed.fingerprint == reference.fingerprint
    assert_same_result(resumed, reference, resumed_model, reference_model)


def test_without_resume_a_checkpoint_is_ignored(four_blocks, calib, tmp_path):
    """resume=False starts over even though a checkpoint exists: every block is quantized again."""
    config = boa.QuantConfig(**CONFIG)
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
        boa.quantize(copy.deepcopy(four_blocks), boa.QuantConfig(**CONFIG), calib, checkpoint_dir=checkpoint,
                     progress=False, on_block_done=stop_after(1))
    config = boa.QuantConfig(**{**CONFIG, "bits": 3}) if change == "bits" else boa.QuantConfig(**CONFIG)
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
    config = boa.QuantConfig(**CONFIG)
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        boa.quantize(twin, config, calib, checkpoint_dir=checkpoint, progress=False, on_block_done=stop_after(1))
    with pytest.raises(boa.BoaError, match="different run"):
        boa.quantize(four_blocks, config, calib, checkpoint_dir=checkpoint, resume=True, progress=False)


def cli_args(model_dir, calib_txt, out, *extra):
    return ["quantize", str(model_dir), "--method", "gptq", "--bits", "4", "--calib", str(calib_txt),
            "--nsamples", "4", "--seqlen", "16", "--out", str(out), "--corpora", "", *extra]


@torch.no_grad()
def logits(model, windows):
    return model(input_ids=windows, use_cache=False).logits


def test_cli_quantize_subprocess(tiny_llama_dir, calib_txt, tmp_path, heldout):
    """`python -m boa.cli quantize` on a model folder with a .txt corpus: exit 0, OUT loads with boa.load and
    matches the same quantization done through the Python API, and OUT.partial (its checkpoint) is removed."""
    out = tmp_path / "OUT"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BOA_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "boa.cli", *cli_args(tiny_llama_dir, calib_txt, out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"saved to {out}" in proc.stderr
    assert "gptq w4g128" in proc.stdout
    assert not (tmp_path / "OUT.partial").exists()

    loaded, tokenizer, config = boa.load(out)
    assert (config.method, config.bits, config.nsamples, config.seqlen) == ("gptq", 4, 4, 16)
    assert tokenizer is not None and tokenizer("w0 w1").input_ids == [2, 3]

    model, tok, adapter = boa.load_model(str(tiny_llama_dir))
    windows = boa.data.calibration_windows(tok, str(calib_txt), 4, 16, 0)
    boa.quantize(model, config, windows, adapter=adapter, progress=False)
    assert torch.equal(logits(loaded, heldout), logits(model, heldout))


def test_cli_resume(tiny_llama_dir, calib_txt, tmp_path, monkeypatch):
    """A run interrupted after block 0 left OUT.partial; `boa quantize ... --resume` quantizes only block 1, writes
    the same files as an uninterrupted CLI run, and removes OUT.partial."""
    out = tmp_path / "OUT"
    model, tok, adapter = boa.load_model(str(tiny_llama_dir))
    config = boa.QuantConfig(method="gptq", bits=4, nsamples=4, seqlen=16)
    windows = boa.data.calibration_windows(tok, str(calib_txt), 4, 16, 0)
    with pytest.raises(Interrupted):
        boa.quantize(model, config, windows, adapter=adapter, checkpoint_dir=tmp_path / "OUT.partial", progress=False,
                     on_block_done=stop_after(0))

    solved = []
    real_solve = boa.pipeline.solve_layer
    monkeypatch.setattr(boa.pipeline, "solve_layer", lambda W, H, cfg, **kw: solved.append(1) or real_solve(W, H, cfg, **kw))
    assert main(cli_args(tiny_llama_dir, calib_txt, out, "--resume")) == 0
    assert len(solved) == 7  # block 1 only
    assert not (tmp_path / "OUT.partial").exists()

    assert main(cli_args(tiny_llama_dir, calib_txt, tmp_path / "FRESH")) == 0
    resumed, fresh = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "FRESH" / "model.safetensors"))
    assert resumed.keys() == fresh.keys()
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)
    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest == json.loads((tmp_path / "FRESH" / "quantization.json").read_text())


def test_cli_turboboa_knobs_reach_the_config(tiny_llama_dir, calib_txt, tmp_path):
    """`--method turboboa` with its knobs: the saved config holds them, method defaults fill the rest."""
    out = tmp_path / "OUT"
    assert main(cli_args(tiny_llama_dir, calib_txt, out, "--method", "turboboa", "--rows-per-step", "4",
                         "--v-row-factor", "identity")) == 0
    _, _, config = boa.load(out)
    assert (config.method, config.rows_per_step, config.v_row_factor) == ("turboboa", 4, "identity")
    assert (config.dx_alpha, config.refine_iters) == (0.25, 1)


def test_cli_aespa_knobs_reach_the_config(tiny_llama_dir, calib_txt, tmp_path):
    """`--method aespa --init gptq`: the saved config holds the init and the rounding knobs, and the init's defaults
    (GPTQ: no dX, no refinement) with aespa's H-weighted grid fill the rest."""
    out = tmp_path / "OUT"
    assert main(cli_args(tiny_llama_dir, calib_txt, out, "--method", "aespa", "--init", "gptq",
                         "--rounding-iters", "20", "--rounding-lr", "0.05")) == 0
    _, _, config = boa.load(out)
    assert (config.method, config.init, config.rounding_iters, config.rounding_lr) == ("aespa", "gptq", 20, 0.05)
    assert (config.grid, config.dx_alpha, config.refine_iters, config.rows_per_step) == ("hessian", 0.0, 0, 1)
