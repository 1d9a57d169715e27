"""Run llm-compressor's GPTQ on fixed calibration windows (peer side of peer_gptq.py).

Runs inside the peer venv (its own torch/transformers), never in boa's venv.
Reads the FP model folder and a safetensors file with the calibration token ids,
writes the fake-quantized (dense float) Linear weights to a safetensors file and
a small JSON with the oneshot wall time, or with the error it raised.
"""

import argparse
import json
import time
from importlib.metadata import version

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--calib", required=True, help="safetensors with 'input_ids' [n, seqlen]")
    p.add_argument("--out-weights", required=True)
    p.add_argument("--out-json", required=True)
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True, help="-1 = per channel")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, required=True)
    p.add_argument("--actorder", choices=["static", "none"], required=True)
    p.add_argument("--percdamp", type=float, required=True)
    p.add_argument("--block-size", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    return p.parse_args()


def build_modifier(args):
    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=args.sym,
        strategy="channel" if args.group_size == -1 else "group",
        group_size=None if args.group_size == -1 else args.group_size,
    )
    return GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],  # GPTQ quantizes the decoder layers only, as boa does
        actorder=None if args.actorder == "none" else args.actorder,
        dampening_frac=args.percdamp,
        block_size=args.block_size,
    )


def calibration_loader(path):
    # A DataLoader is used as is by oneshot: no re-tokenizing, shuffling or truncation.
    ids = load_file(path)["input_ids"]
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    return DataLoader(rows, batch_size=1, shuffle=False)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    loader = calibration_loader(args.calib)
    result = {"name": f"llm-compressor {version('llmcompressor')}"}
    start = time.perf_counter()
    try:
        oneshot(model=model, dataset=loader, recipe=build_modifier(args))
    except Exception as exc:  # reported in the benchmark JSON instead of crashing it
        first_paragraph = str(exc).split("\n\n")[0]  # some errors then list every layer
        result["error"] = f"{type(exc).__name__}: {first_paragraph}"
    else:
        result["seconds"] = time.perf_counter() - start
        # After oneshot each quantized Linear's .weight holds the dequantized values;
        # scales/zero points live in extra parameters that we do not need.
        quantized = {f"{name}.weight": module.weight.detach().contiguous()
                     for name, module in model.named_modules()
                     if hasattr(module, "weight_scale")}
        save_file(quantized, args.out_weights)
        result["quantized_weights"] = len(quantized)
    with open(args.out_json, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
