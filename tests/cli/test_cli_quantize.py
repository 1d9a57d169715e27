"""`boa quantize` end to end on a tiny model folder: in a subprocess, resumed after an interruption, its method
flags reaching the saved typed config, and its --json report."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import boa
from boa.cli import main
from boa.pipeline import calibration_record

from conftest import Interrupted, stop_after


def cli_args(model_dir, calib_txt, out, *extra):
    return ["quantize", str(model_dir), "--method", "gptq", "--bits", "4", "--calib", str(calib_txt),
            "--nsamples", "4", "--seqlen", "16", "--out", str(out), "--corpora", "", *extra]


@torch.no_grad()
def logits(model, windows):
    return model(input_ids=windows, use_cache=False).logits


def test_cli_quantize_subprocess(tiny_llama_dir, calib_txt, tmp_path, heldout):
    """`python -m boa.cli quantize` on a model folder with a .txt corpus: exit 0, OUT loads with boa.load and
    matches the same quantization done through the Python API, the manifest records the calibration windows (count,
    length, digest, corpus, seed), and OUT.partial (its checkpoint) is removed."""
    out = tmp_path / "OUT"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BOA_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "boa.cli", *cli_args(tiny_llama_dir, calib_txt, out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"saved to {out}" in proc.stderr
    assert "gptq w4g128" in proc.stdout
    assert not (tmp_path / "OUT.partial").exists()

    loaded, tokenizer, config = boa.load(out)
    assert config == boa.QuantConfig(boa.GPTQ(bits=4))
    assert tokenizer is not None and tokenizer("w0 w1").input_ids == [2, 3]

    model, tok, adapter = boa.load_model(str(tiny_llama_dir))
    windows = boa.data.calibration_windows(tok, str(calib_txt), 4, 16, 0)
    calibration = json.loads((out / "quantization.json").read_text())["calibration"]
    assert calibration == {**calibration_record(windows), "corpus": str(calib_txt), "seed": 0}
    assert (calibration["nsamples"], calibration["seqlen"]) == (4, 16)
    boa.quantize(model, config, windows, adapter=adapter, progress=False)
    assert torch.equal(logits(loaded, heldout), logits(model, heldout))


def test_cli_resume(tiny_llama_dir, calib_txt, tmp_path, monkeypatch):
    """A run interrupted after block 0 left OUT.partial; `boa quantize ... --resume` quantizes only block 1, writes
    the same files as an uninterrupted CLI run, and removes OUT.partial."""
    out = tmp_path / "OUT"
    model, tok, adapter = boa.load_model(str(tiny_llama_dir))
    method = boa.GPTQ(bits=4)
    windows = boa.data.calibration_windows(tok, str(calib_txt), 4, 16, 0)
    with pytest.raises(Interrupted):
        boa.quantize(model, method, windows, adapter=adapter, checkpoint_dir=tmp_path / "OUT.partial", progress=False,
                     on_block_done=stop_after(0))

    solved = []
    real_solve = boa.GPTQ.solve
    monkeypatch.setattr(boa.GPTQ, "solve", lambda self, W, stats, **kw: solved.append(1) or real_solve(self, W, stats,
                                                                                                        **kw))
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
                         "--v-row-factor", "identity", "--dx-windows", "8")) == 0
    _, _, config = boa.load(out)
    method = config.method
    assert type(method) is boa.TurboBoA and (method.rows_per_step, method.v_row_factor) == (4, "identity")
    assert (method.dx_alpha, method.dx_windows, method.refine_iters) == (0.25, 8, 1)
    assert method == boa.TurboBoA(bits=4, group_size=128, rows_per_step=4, v_row_factor="identity", dx_windows=8)


def test_cli_aespa_knobs_reach_the_config(tiny_llama_dir, calib_txt, tmp_path):
    """`--method aespa --init gptq`: the saved config holds the init and the rounding knobs, and the init's defaults
    (GPTQ: no dX, no refinement, no row steps) with aespa's H-weighted grid fill the rest."""
    out = tmp_path / "OUT"
    assert main(cli_args(tiny_llama_dir, calib_txt, out, "--method", "aespa", "--init", "gptq",
                         "--rounding-iters", "20", "--rounding-lr", "0.05")) == 0
    _, _, config = boa.load(out)
    method = config.method
    assert type(method) is boa.Aespa and type(method.init) is boa.GPTQ
    assert (method.rounding_iters, method.rounding_lr) == (20, 0.05)
    assert (method.init.grid, method.init.dx_alpha, method.init.refine_iters) == ("hessian-fast", 0.0, 0)
    assert not hasattr(method.init, "rows_per_step")  # GPTQ solves a head's rows in one pass
    assert method == boa.Aespa(init=boa.GPTQ(bits=4, group_size=128, grid="hessian-fast"), rounding_iters=20,
                               rounding_lr=0.05)


def test_cli_rotation_and_activation_flags_reach_the_config(tiny_llama_dir, calib_txt, tmp_path, heldout):
    """`--rotate --a-bits 8 --a-float-stats --seed 3`: QuaRot seeded by --seed, then 8-bit activations (statistics
    from float ones); the folder loads with its Hadamards and quantizers attached and is evaluated by `boa eval`."""
    from boa.transforms import ActivationQuant, QuaRot

    out = tmp_path / "OUT"
    assert main(cli_args(tiny_llama_dir, calib_txt, out, "--rotate", "--a-bits", "8", "--a-clip", "0.8",
                         "--a-float-stats", "--seed", "3")) == 0
    model, _, config = boa.load(out)
    assert config.transforms == (QuaRot(seed=3), ActivationQuant(bits=8, clip_ratio=0.8, calibrate=False))
    assert model.boa_transforms == config.transforms
    assert main(["eval", str(out), "--corpora", "", "--eval-windows", "1"]) == 0


def test_cli_json_report_holds_the_config_and_calibration(tiny_llama_dir, calib_txt, tmp_path):
    report = tmp_path / "report.json"
    assert main(cli_args(tiny_llama_dir, calib_txt, tmp_path / "OUT", "--method", "boa", "--bits", "3",
                         "--cache-dtype", "float16", "--json", str(report))) == 0
    info = json.loads(report.read_text())
    config = boa.QuantConfig(boa.BoA(bits=3), cache_dtype="float16")
    assert info["config"] == config.to_dict()
    assert info["calibration"] == json.loads((tmp_path / "OUT" / "quantization.json").read_text())["calibration"]
    assert (info["calibration"]["nsamples"], info["calibration"]["seqlen"]) == (4, 16)
    assert info["calibration"]["corpus"] == str(calib_txt) and info["calibration"]["seed"] == 0
    assert info["results"][0]["model"] == "boa w3g128"


def test_cli_target_bits_mixes_widths_in_memory_and_streamed(tiny_llama_dir, calib_txt, tmp_path, monkeypatch):
    """--target-bits: the report gives the stored bits (within the target) and the layers per width, the manifest
    holds layers of several widths and the config their widths, and a streamed run (which measures block by block
    from the shards) writes the same files."""
    def cache_in(folder):  # the measurements' cache only: $BOA_CACHE also holds the built kernels
        def cache_dir(*parts):
            path = folder.joinpath(*parts)
            path.mkdir(parents=True, exist_ok=True)
            return path

        monkeypatch.setattr(boa.core.io, "cache_dir", cache_dir)

    cache_in(tmp_path / "cache")
    mixed = ["--bits", "3", "--group-size", "32", "--target-bits", "3.6", "--widths", "2g32,3,3g32,4", "--device", "cpu"]
    report = tmp_path / "report.json"
    assert main(cli_args(tiny_llama_dir, calib_txt, tmp_path / "MEMORY", *mixed, "--json", str(report))) == 0
    info = json.loads(report.read_text())["mixed_precision"]
    assert info["target_bits"] == 3.6 and info["bits"] <= 3.6
    assert sum(info["layers"].values()) == 14 and len(info["layers"]) > 1
    manifest = json.loads((tmp_path / "MEMORY" / "quantization.json").read_text())
    assert len({(layer["bits"], layer["group_size"]) for layer in manifest["layers"].values()}) > 1
    assert manifest["config"]["widths"]
    cache_in(tmp_path / "cache2")  # measured again, block by block from the shards
    assert main(cli_args(tiny_llama_dir, calib_txt, tmp_path / "STREAMED", *mixed, "--stream", "always")) == 0
    assert len(list((tmp_path / "cache2" / "widths").iterdir())) == 1
    a, b = weight_tensors(tmp_path / "MEMORY"), weight_tensors(tmp_path / "STREAMED")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def weight_tensors(folder):
    from boa.core.shards import weight_files

    tensors = {}
    for path in weight_files(folder):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.mark.parametrize("method", ["gptq", "turboboa"])
def test_cli_streamed_run_writes_what_the_in_memory_run_writes(tiny_llama_dir, calib_txt, tmp_path, method):
    """--stream always (blocks read from the shards one at a time, output in shards) and --stream never give the
    same tensors and manifest; the streamed run's evaluation loads what it saved."""
    memory, streamed = tmp_path / "MEMORY", tmp_path / "STREAMED"
    common = ["--method", method, "--device", "cpu", "--corpora", "wikipedia", "--eval-windows", "2",
              "--eval-seqlen", "16"]
    reports = tmp_path / "memory.json", tmp_path / "streamed.json"
    assert main([*cli_args(tiny_llama_dir, calib_txt, memory), *common, "--stream", "never",
                 "--json", str(reports[0])]) == 0
    assert main([*cli_args(tiny_llama_dir, calib_txt, streamed), *common, "--stream", "always",
                 "--max-shard-size", "20KB", "--json", str(reports[1])]) == 0
    assert len(list(streamed.glob("model-*-of-*.safetensors"))) > 1
    a, b = weight_tensors(memory), weight_tensors(streamed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((memory / "quantization.json").read_text())
            == json.loads((streamed / "quantization.json").read_text()))
    ppl = [json.loads(r.read_text())["results"][0]["ppl_wikipedia"] for r in reports]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-4)


def test_cli_streamed_run_resumes(tiny_llama_dir, calib_txt, tmp_path, monkeypatch):
    """A streamed run interrupted after block 0 resumes with --resume, quantizes block 1 only, and writes what an
    uninterrupted run writes."""
    out, fresh = tmp_path / "OUT", tmp_path / "FRESH"
    args = ["--stream", "always", "--device", "cpu"]
    real_quantize = boa.pipeline.loop.quantize
    monkeypatch.setattr(boa.pipeline, "quantize", lambda *a, **kw: real_quantize(*a, **kw,
                                                                                 on_block_done=stop_after(0)))
    with pytest.raises(Interrupted):
        main(cli_args(tiny_llama_dir, calib_txt, out, *args))
    monkeypatch.setattr(boa.pipeline, "quantize", real_quantize)
    solved = []
    real_solve = boa.GPTQ.solve
    monkeypatch.setattr(boa.GPTQ, "solve", lambda self, W, stats, **kw: solved.append(1) or real_solve(self, W, stats,
                                                                                                        **kw))
    assert main(cli_args(tiny_llama_dir, calib_txt, out, *args, "--resume")) == 0
    assert len(solved) == 7
    assert main(cli_args(tiny_llama_dir, calib_txt, fresh, *args)) == 0
    a, b = weight_tensors(out), weight_tensors(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_offload_choices_are_the_pipelines():
    from boa import cli, pipeline

    assert cli.OFFLOADS == pipeline.OFFLOADS


def test_cli_nproc_2_writes_what_one_process_writes(tiny_llama_dir, calib_txt, tmp_path):
    """`boa quantize --nproc 2` (torchrun, 2 gloo processes on the CPU) with float64 statistics saves the codes one
    process saves; only rank 0 reports."""
    one, two = tmp_path / "ONE", tmp_path / "TWO"
    flags = ["--device", "cpu", "--hessian-dtype", "float64"]
    assert main(cli_args(tiny_llama_dir, calib_txt, one, *flags)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BOA_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "boa.cli", *cli_args(tiny_llama_dir, calib_txt, two, *flags),
                           "--nproc", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("gptq w4g128") == 1
    a, b = weight_tensors(one), weight_tensors(two)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0)
        else:
            assert torch.equal(a[key], b[key]), key


def test_cli_4_bit_activations_turn_the_dx_correction_off_unless_asked():
    """TurboBoA's dX term costs accuracy under 4-bit activations (README's rotated W4A4-KV4 rows): --a-bits 4 makes
    its default 0, for aespa's TurboBoA init too; --dx-alpha still sets it, and 8-bit activations keep 0.25."""
    from boa.cli import _method, _parser

    def method(*flags):
        return _method(_parser().parse_args(["quantize", "m", *flags]))

    assert method("--method", "turboboa", "--a-bits", "4").dx_alpha == 0
    assert method("--method", "aespa", "--a-bits", "4").init.dx_alpha == 0
    assert method("--method", "turboboa", "--a-bits", "4", "--dx-alpha", "0.5").dx_alpha == 0.5
    assert method("--method", "turboboa", "--a-bits", "8").dx_alpha == 0.25
    assert method("--method", "turboboa").dx_alpha == 0.25


def test_cli_moe_report_lists_each_experts_calibration_tokens(calib_txt, tmp_path, word_tokenizer, capsys):
    """A Mixtral folder: every expert's layers quantized; --json holds each expert layer's routed token count (64
    tokens here: under MIN_EXPERT_TOKENS, so every expert takes its block's pooled Hessian, which stderr says)."""
    from conftest import build_mixtral

    folder = tmp_path / "mixtral"
    build_mixtral().save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    report = tmp_path / "report.json"
    assert main(cli_args(folder, calib_txt, tmp_path / "OUT", "--json", str(report))) == 0
    tokens = json.loads(report.read_text())["expert_tokens"]
    assert len(tokens) == 2 * 4 * 3 and all(0 <= n <= 4 * 16 for n in tokens.values())
    assert sum(tokens[f"model.layers.0.mlp.experts.{e}.gate_proj"] for e in range(4)) == 4 * 16 * 2  # top-2
    assert "24 expert layers saw fewer than 128 calibration tokens" in capsys.readouterr().err
