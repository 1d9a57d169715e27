"""End-to-end quantization time of the packaged SmolLM2 per method, side by side, against this machine's compute
floor.

    python bench/speed.py --methods gptq,gptq-strong,boa,turboboa --bits 3 --nsamples 32 --threads 2 \
        --json bench/results/speed_w3.json

A method entry may carry overrides of its settings after colons, as in bench/quality.py (`gptq:grid=hessian`).
`--rows-per-step 1,4,16,64` adds BoA and TurboBoA at each N (rows of a head solved jointly; BoA's default is 1,
TurboBoA's 16), so that the speed-up TurboBoA's N-row steps buy is seen beside the methods' defaults:

    python bench/speed.py --methods gptq --rows-per-step 1,4,16,64 --blocks 6 --json bench/results/speed_rows.json

For each method: the wall time of `boa.quantize` on a fresh copy of the model (all blocks, or the first --blocks),
its ratio to the first method's (GPTQ), and the run's own FLOP count — every matmul, attention and Hessian product
it executes, counted by torch's FlopCounterMode on the first --count-blocks blocks and scaled to all of them (the
blocks are alike) — divided by the fp32 GEMM rate measured here on a forward-sized product: the compute floor.
Not counted: the fused column-compensation kernel's own arithmetic (rows × B² per block of columns, a few per cent of
the solver's GEMMs) and elementwise work. Files written before the in-place products (the Hessian accumulations'
addmm_) were counted undercount every method's FLOPs by those.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

import boa
from boa_kernels import backend_for

from _common import Setting, machine, parse_methods  # bench/ is sys.path[0] when run as a script


@register_flop_formula([torch.ops.aten.addmm_, torch.ops.aten.baddbmm_])
def _in_place_product_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode counts addmm but not its in-place form, which every Hessian accumulation (H += xᵀx) uses."""
    return 2 * math.prod(a_shape) * b_shape[-1]


def gemm_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Measured fp32 GEMM rate, FLOP/s, on an (m × k) @ (k × n) product."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def quantize_copy(fp_model, adapter, calib, config, blocks: int):
    model = copy.deepcopy(fp_model)
    del adapter.blocks(model)[blocks:]
    start = time.perf_counter()
    boa.quantize(model, config, calib, adapter=adapter, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="gptq,gptq-strong,boa,turboboa")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=-1)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--blocks", type=int, help="quantize only the first N blocks (default: all)")
    parser.add_argument("--count-blocks", type=int, default=1, help="blocks whose FLOPs are counted, then scaled")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--floor-only", action="store_true",
                        help="count FLOPs and report the floor without timing the full runs (e.g. at 128 samples)")
    parser.add_argument("--rows-per-step", help="comma-separated N: also boa and turboboa at rows_per_step=N")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setting = Setting(args.bits, args.group_size)
    entries = args.methods.split(",")
    if args.rows_per_step:
        entries += [f"{method}:rows_per_step={n}" for n in args.rows_per_step.split(",") for method in ("boa",
                                                                                                       "turboboa")]
    configs = [(entry.entry, entry.config(setting)) for entry in parse_methods(",".join(entries))]

    fp_model, tokenizer, adapter = boa.load_model("smollm2-135m")
    blocks = args.blocks or len(adapter.blocks(fp_model))
    calib = boa.data.calibration_windows(tokenizer, "wikipedia", args.nsamples, args.seqlen)
    hidden = fp_model.config.hidden_size
    rate = gemm_rate(args.nsamples * args.seqlen, hidden, fp_model.config.intermediate_size)
    print(f"fp32 GEMM rate: {rate / 1e9:.1f} GFLOP/s on {args.threads} threads; kernels: {backend_for('cpu')}")

    rows = []
    for method, config in configs:  # method: the entry as given, e.g. "turboboa:rows_per_step=4"
        counter = FlopCounterMode(display=False)
        with counter:
            quantize_copy(fp_model, adapter, calib, config, args.count_blocks)
        flops = counter.get_total_flops() / args.count_blocks * blocks
        if args.floor_only:
            print(f"{method:18s} {flops / 1e9:9.0f} GFLOP  floor {flops / rate:7.1f} s", flush=True)
            rows.append({"method": method, "bits": args.bits, "group_size": args.group_size,
                         "nsamples": args.nsamples, "seqlen": args.seqlen, "blocks": blocks,
                         "threads": args.threads, "gflop": flops / 1e9, "floor_seconds": flops / rate})
            continue
        seconds = quantize_copy(fp_model, adapter, calib, config, blocks)
        row = {
            "method": method, "bits": args.bits, "group_size": args.group_size, "nsamples": args.nsamples,
            "seqlen": args.seqlen, "blocks": blocks, "threads": args.threads, "seconds": seconds,
            "gflop": flops / 1e9, "floor_seconds": flops / rate, "ratio_to_floor": seconds * rate / flops,
        }
        row["ratio_to_first"] = seconds / rows[0]["seconds"] if rows else 1.0
        rows.append(row)
        print(f"{method:18s} {seconds:8.1f} s  ({seconds / blocks:.2f} s/block)  {row['gflop']:9.0f} GFLOP  "
              f"floor {row['floor_seconds']:7.1f} s  ×floor {row['ratio_to_floor']:.2f}  "
              f"×{rows[0]['method']} {row['ratio_to_first']:.2f}", flush=True)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {**machine(), "torch": torch.__version__,
                "gemm_gflops": rate / 1e9, "kernels": backend_for("cpu")}
        args.json.write_text(json.dumps({"machine": info, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
