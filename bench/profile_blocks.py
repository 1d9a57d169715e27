"""Where quantization time goes: profile the first few blocks of the packaged SmolLM2 under each method.

    python bench/profile_blocks.py --methods gptq,turboboa --blocks 2 --nsamples 32 --bits 3 [--group-size -1]

Prints, per method, the wall time per block and the cumulative seconds spent in the pipeline's phases (statistics
passes, the FP-path forward, attention recording, Hessian/dX accumulation, the solver, grid search, scale
refinement), measured with cProfile on the same calibration windows. Use --threads 1 when another job shares the
machine: oversubscribed BLAS threads distort the split.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import time

import torch

import boa
from boa.algorithms import method_from_dict

PHASES = {
    "statistics passes": "collect_statistics",
    "FP-path forward": "run_fp_block",
    "block outputs (both paths)": "run_block",
    "attention recording": "record",
    "Hessian / dX accumulation": "add",
    "solver": "obs_solve",
    "grid search": "find_grid",
    "scale refinement": "refine_scales",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="gptq,turboboa")
    parser.add_argument("--blocks", type=int, default=2, help="quantize only the first N blocks")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=-1)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    fp_model, tokenizer, adapter = boa.load_model("smollm2-135m")
    calib = boa.data.calibration_windows(tokenizer, "wikipedia", args.nsamples, args.seqlen)
    for method in args.methods.split(","):
        model = copy.deepcopy(fp_model)
        del adapter.blocks(model)[args.blocks:]
        config = method_from_dict({"method": method, "bits": args.bits, "group_size": args.group_size})
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        boa.quantize(model, config, calib, adapter=adapter, progress=False)
        profiler.disable()
        seconds = time.perf_counter() - start
        cumulative = {}
        for (_, _, function), (_, _, _, cum, _) in pstats.Stats(profiler).stats.items():
            cumulative[function] = cumulative.get(function, 0.0) + cum
        split = ", ".join(f"{phase} {cumulative.get(fn, 0.0) / args.blocks:.2f}" for phase, fn in PHASES.items())
        print(f"{method}: {seconds / args.blocks:.2f} s/block ({split} s/block)", flush=True)


if __name__ == "__main__":
    main()
