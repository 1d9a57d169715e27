"""Does boa's GPTQ export load, and compute what boa computed, where GPTQ checkpoints are read?

    python bench/check_gptq_export.py [--no-smollm2] [--json bench/results/gptq_export_check.json]

In boa's venv: quantize with boa (a tiny random Llama at several settings, and the packaged SmolLM2-135M), keep the
fake-quantized model's logits on fixed token windows, write each model with boa.export.export_gptq. Then in a venv
of its own ($BOA_CACHE/venvs/gptq, made on first use: pip install gptqmodel==7.6.0 torch==2.13.0 optimum; gptqmodel
builds from its sdist and pins numpy 2.2.6, so it cannot share boa's venv) this same file runs with --worker:
transformers.AutoModelForCausalLM.from_pretrained(export) (optimum and gptqmodel pick the kernel), the logits of the
same windows, and what became of each quantized layer.

Per case: the largest absolute difference and the relative difference ‖Δ‖/‖ref‖ of the logits against
    fake-quant  boa's fake-quantized float32 model, the model boa evaluates;
    fp16-grids  that model in float16 with its grids rounded to float16: what the format holds (float16 scales)
                and what gptqmodel's CPU kernels compute in (float16), so only a format error would show large here;
the fp16 noise floor (fp16-grids against fake-quant); the loaded layers' own dequantized weights
(gptqmodel's dequantize_weight, before any forward) against scale16 · (code − zero) rounded to float16, for the
first and last decoder block (exact unless the file decodes to other codes, zeros or scales); the kernel class,
and whether the layers stayed packed: no dense weight (a parameter, buffer or cached
tensor of out × in floats) held after a forward pass, with the dtype of their qweight (a kernel may repack it into
its own layout, as TorchAtenLinear's int4pack does).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

REQUIREMENTS = ["gptqmodel==7.6.0", "torch==2.13.0", "optimum"]  # torch pinned: the local CPU wheel, not CUDA
TINY_CASES = {
    "tiny w4g32 sym": dict(bits=4, group_size=32, sym=True),
    "tiny w3g32 asym": dict(bits=3, group_size=32),
    "tiny w2g32 asym": dict(bits=2, group_size=32),
    "tiny w8g32 sym": dict(bits=8, group_size=32, sym=True),
    "tiny w4g32 asym act-order": dict(bits=4, group_size=32, act_order=True),
    "tiny w2 per-channel asym": dict(bits=2, group_size=-1),
    "tiny w4 per-channel sym": dict(bits=4, group_size=-1, sym=True),  # gptqmodel's CPU int4 kernel is known to fail
}
SMOLLM2_CASES = {  # hidden size 576 = 4.5 × 128: with g128 each 576-column layer ends in a half group
    "smollm2-135m w4g128 sym": dict(bits=4, group_size=128, sym=True),
    "smollm2-135m w4g64 sym": dict(bits=4, group_size=64, sym=True),
    "smollm2-135m w3g64 asym": dict(bits=3, group_size=64),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=True,
                   help="also quantize and check the packaged SmolLM2-135M (about a minute per setting)")
    p.add_argument("--json", type=Path, default=Path("bench/results/gptq_export_check.json"))
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # the task file, inside the gptq venv
    return p.parse_args()


# boa's side ----------------------------------------------------------------------------------------------------


def gptq_python() -> Path:
    """The gptq venv's python, creating the venv on first use."""
    from _common import side_venv  # imported here: the worker runs this file inside the gptq venv, without boa

    from boa.core.io import cache_dir

    return side_venv(cache_dir("venvs", "gptq"), REQUIREMENTS)


def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval(), None


def windows(tokenizer, n: int, seqlen: int, seed: int):
    import torch

    import boa

    if tokenizer is None:
        return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return boa.data.calibration_windows(tokenizer, "wikipedia", n, seqlen, seed)


def fp16_grid_weights(layers) -> dict:
    """Each quantized layer's scale16 · (codes − zero), in float16."""
    from boa.core.quantizer import QuantizedWeight

    return {name: QuantizedWeight(q.codes, q.scale.half().float(), q.zero, q.g_idx, q.bits).dequantize().half()
            for name, q in layers.items()}


def fp16_grid_model(model, weights: dict):
    """A float16 copy of the fake-quantized model whose quantized layers hold `weights`."""
    import copy

    import torch

    half = copy.deepcopy(model).half()
    with torch.no_grad():
        for name, weight in weights.items():
            half.get_submodule(name).weight.copy_(weight)
    return half


def prepare(case: str, settings: dict, folder: Path) -> dict:
    """Quantizes, exports, and stores the windows and both reference logits in `folder`."""
    import torch
    from safetensors.torch import save_file

    import boa
    from boa.export import export_gptq

    smollm2 = case.startswith("smollm2")
    model, tokenizer = boa.load_model("smollm2-135m")[:2] if smollm2 else tiny_llama()
    calib = windows(tokenizer, 16, 256 if smollm2 else 64, seed=0)
    inputs = windows(tokenizer, 4, 128 if smollm2 else 64, seed=1)
    start = time.perf_counter()
    result = boa.quantize(model, boa.GPTQ(**settings), calib, progress=False)
    seconds = time.perf_counter() - start
    weights = fp16_grid_weights(result.layers)
    with torch.no_grad():
        fake_quant = model(inputs, use_cache=False).logits
        fp16_grids = fp16_grid_model(model, weights)(inputs, use_cache=False).logits.float()
    export_gptq(model, result.layers, folder / "export", tokenizer, result.config)
    save_file({"inputs": inputs, "fake_quant": fake_quant, "fp16_grids": fp16_grids}, str(folder / "ref.safetensors"))
    blocks = {".layers.0.", f".layers.{model.config.num_hidden_layers - 1}."}
    save_file({n: w for n, w in weights.items() if any(b in n for b in blocks)}, str(folder / "weights.safetensors"))
    zero_points_of_zero = sum(int((q.zero == 0).sum()) for q in result.layers.values())
    return {"settings": settings, "quantize_seconds": round(seconds, 1), "quantized_layers": len(result.layers),
            "mirrored_groups": zero_points_of_zero}


def compare(ref, got) -> dict:
    diff = (got.float() - ref.float())
    return {"max_abs_diff": diff.abs().max().item(), "rel_diff": (diff.norm() / ref.float().norm()).item()}


def main(args) -> None:
    from safetensors.torch import load_file

    cases = {**TINY_CASES, **(SMOLLM2_CASES if args.smollm2 else {})}
    python = gptq_python()
    report = {"requirements": REQUIREMENTS, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="boa-gptq-check-") as tmp:
        tmp = Path(tmp)
        tasks = {}
        for i, (case, settings) in enumerate(cases.items()):
            print(f"quantizing and exporting: {case}", flush=True)
            folder = tmp / f"case{i}"
            report["cases"][case] = prepare(case, settings, folder)
            tasks[case] = str(folder)
        (tmp / "tasks.json").write_text(json.dumps(tasks))
        print(f"loading the exports in {python}", flush=True)
        # -I: the worker runs in its own venv; nothing from bench/ or the user site may shadow its packages
        run = subprocess.run([str(python), "-I", __file__, "--worker", str(tmp / "tasks.json")],
                             capture_output=True, text=True)
        if run.returncode != 0:
            report["worker_error"] = run.stderr[-4000:]
        worker = json.loads((tmp / "worker.json").read_text()) if (tmp / "worker.json").exists() else {}
        report["gptq_venv"] = worker.pop("versions", None)
        for case, folder in tasks.items():
            row = report["cases"][case]
            row.update(worker.get(case, {"error": "the worker did not reach this case"}))
            if row.get("error"):
                continue
            ref, got = load_file(f"{folder}/ref.safetensors"), load_file(f"{folder}/logits.safetensors")["logits"]
            row["vs_fake_quant"] = compare(ref["fake_quant"], got)
            row["vs_fp16_grids"] = compare(ref["fp16_grids"], got)
            row["fp16_noise_floor"] = compare(ref["fake_quant"], ref["fp16_grids"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"wrote {args.json}")


def print_report(report: dict) -> None:
    print(f"\n{'case':28} {'kernel':17} {'packed':7} {'weights':8} {'vs fake-quant (max, rel)':26} "
          f"{'vs fp16-grids (max, rel)':26} fp16 floor (max, rel)")
    for case, row in report["cases"].items():
        if row.get("error"):
            print(f"{case:28} FAILED: {row['error'].splitlines()[-1][:150]}")
            continue
        cells = [f"{d['max_abs_diff']:9.3g} {d['rel_diff']:9.3g}" + " " * 7
                 for d in (row["vs_fake_quant"], row["vs_fp16_grids"], row["fp16_noise_floor"])]
        weights = "exact" if row["weights_exact"] else f"{row['weights_max_abs_diff']:.2g}"
        print(f"{case:28} {','.join(row['kernels']):17} {str(row['packed']):7} {weights:8} {' '.join(cells).rstrip()}")
    if report.get("worker_error"):
        print("worker stderr (tail):\n" + report["worker_error"][-1500:])


# the gptq venv's side --------------------------------------------------------------------------------------------


def dense_copies(module) -> list[str]:
    """Names of floating tensors of out × in elements the module holds: a dequantized weight kept beside qweight."""
    import torch

    size = module.in_features * module.out_features
    found = []

    def visit(name, value):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel() == size:
                found.append(name)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(f"{name}[{key!r}]", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{name}[{i}]", item)

    for name, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False),
                        *vars(module).items()]:
        visit(name, value)
    return sorted(set(found))


def weight_check(model, reference: dict) -> dict:
    """The loaded layers' dequantized weights against the reference: checked layers, largest |Δ|, all exact."""
    import torch

    worst = 0.0
    with torch.no_grad():
        for name, ref in reference.items():
            got = model.get_submodule(name).dequantize_weight().t()  # gptqmodel's weights are (in, out)
            worst = max(worst, (got.float() - ref.float()).abs().max().item())
    return {"weights_checked": len(reference), "weights_max_abs_diff": worst, "weights_exact": worst == 0.0}


def worker(task_file: Path) -> None:
    """Loads every export with transformers, runs the stored windows, records kernels and packing."""
    import traceback
    from importlib.metadata import version

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    out = {"versions": {p: version(p) for p in ("gptqmodel", "optimum", "transformers", "torch", "numpy")}}
    tasks = json.loads(task_file.read_text())
    for case, folder in tasks.items():
        try:
            inputs = load_file(f"{folder}/ref.safetensors")["inputs"]
            model = AutoModelForCausalLM.from_pretrained(f"{folder}/export", dtype=torch.float16, device_map="cpu")
            weights = weight_check(model, load_file(f"{folder}/weights.safetensors"))
            with torch.no_grad():
                logits = model(inputs, use_cache=False).logits.float()
            save_file({"logits": logits.contiguous()}, f"{folder}/logits.safetensors")
            layers = [n for n, m in model.named_modules() if hasattr(m, "qweight")]
            dense = {n: d for n in layers if (d := dense_copies(model.get_submodule(n)))}
            out[case] = {
                "kernels": sorted({type(model.get_submodule(n)).__name__ for n in layers}),
                "quantized_layers_loaded": len(layers),
                "packed": bool(layers) and not dense,
                "qweight_dtypes": sorted({str(model.get_submodule(n).qweight.dtype) for n in layers}),
                "dense_copies": dict(list(dense.items())[:3]),
                **weights,
            }
        except Exception:  # noqa: BLE001 - each case reports its own failure and the next one still runs
            out[case] = {"error": traceback.format_exc()[-3000:]}
        task_file.with_name("worker.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker(arguments.worker)
    else:
        main(arguments)
