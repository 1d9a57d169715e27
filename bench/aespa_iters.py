"""aespa: quality and time against the number of learned-rounding steps, on the first few blocks of a model.

    python bench/aespa_iters.py --model smollm2-135m --blocks 3 --setting w2g64 --iters 100,500,2000 \\
        --json bench/results/aespa_iters_w2g64.json [--threads 2]

Only the first `--blocks` decoder blocks are quantized (the rest stay in full precision), once with the init method
alone (`--init`, e.g. turboboa: the "0 steps" row, exactly the init the aespa rows start from: aespa's H-weighted
grid, and the init's settings among --overrides) and once per step count with aespa from that init, all on one set
of calibration windows. --overrides are aespa's settings and its init's (as bench/quality.py's method entries).
Each row reports the seconds of boa.quantize, the sum of the quantized layers' objectives
(boa's per-layer losses, tr(H_out ΔW H ΔWᵀ)) relative to the init's, per layer kind, and the perplexity of the
partly quantized model on held-out Wikipedia and Austen text — the end-to-end effect of those blocks alone.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

import boa
from boa.algorithms import method_from_dict
from boa.core.io import atomic_file
from boa.eval import evaluate_perplexity

from _common import RESERVED, method_fields, parse_settings  # bench/ is on sys.path


def quantize_first_blocks(model, adapter, config, calib, blocks: int):
    """boa.quantize on the model's first `blocks` blocks only (the list is cut for the run, then restored)."""
    layers = adapter.blocks(model)
    rest = list(layers[blocks:])
    del layers[blocks:]
    try:
        start = time.perf_counter()
        result = boa.quantize(model, config, calib, adapter=adapter, progress=True)
        return result, time.perf_counter() - start
    finally:
        layers.extend(rest)


def by_kind(losses: dict[str, float]) -> dict[str, float]:
    """Sum of the objectives per layer kind (q_proj, k_proj, ...), over the quantized blocks."""
    total = defaultdict(float)
    for name, value in losses.items():
        total[name.rsplit(".", 1)[-1]] += value
    return dict(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=3, help="how many leading blocks to quantize")
    parser.add_argument("--setting", default="w2g64", help="wBITS[gGROUP]")
    parser.add_argument("--init", default="turboboa", help="aespa's init method (also the 0-step row)")
    parser.add_argument("--iters", default="100,500,2000", help="comma-separated learned-rounding step counts")
    parser.add_argument("--overrides", default="",
                        help="settings of aespa or of its init, key=value,... (e.g. rounding_lr=0.05,rows_per_step=4)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    (setting,) = parse_settings(args.setting)
    bits, group_size = setting.bits, setting.group_size
    overrides = {}
    for item in filter(None, args.overrides.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1].isdigit() or value[:1] == "-" else value
    known = method_fields("aespa", {"init": args.init}) - set(RESERVED) - {"init", "rounding_iters"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"--overrides: {', '.join(unknown)} not settings of aespa from {args.init}; known: "
                         f"{', '.join(sorted(known))}")

    def aespa(steps: int):
        try:
            return method_from_dict({"method": "aespa", "init": args.init, "bits": bits, "group_size": group_size,
                                     "rounding_iters": steps, **overrides})
        except boa.BoaError as e:
            raise SystemExit(f"aespa from {args.init}: {e}") from None

    runs = [(0, aespa(1).init)] + [(int(n), aespa(int(n))) for n in args.iters.split(",")]

    fp_model, tokenizer, adapter = boa.load_model(args.model)
    calib = boa.data.calibration_windows(tokenizer, "wikipedia", nsamples=args.nsamples, seqlen=args.seqlen)
    header = {"model": args.model, "blocks": args.blocks, "setting": setting.label,
              "init": args.init, "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows,
              "threads": torch.get_num_threads(), "overrides": overrides}
    rows, reference = [], None
    for steps, config in runs:
        model = copy.deepcopy(fp_model)
        result, seconds = quantize_first_blocks(model, adapter, config, calib, args.blocks)
        kinds = by_kind(result.losses)
        reference = reference or kinds
        ppl = evaluate_perplexity(model, tokenizer, max_windows=args.eval_windows)
        row = {"steps": steps, "method": config.name, "config": config.to_dict(), "seconds": seconds, **ppl,
               "objective": sum(kinds.values()), "objective_vs_init": sum(kinds.values()) / sum(reference.values()),
               "objective_by_kind_vs_init": {k: v / reference[k] for k, v in kinds.items()}}
        rows.append(row)
        with atomic_file(Path(args.json)) as tmp:
            tmp.write_text(json.dumps({**header, "results": rows}, indent=2) + "\n")
        kinds_text = " ".join(f"{k}={v:.3f}" for k, v in row["objective_by_kind_vs_init"].items())
        print(f"steps={steps:5d} {row['method']:9s} {seconds:7.1f}s  wiki={ppl['ppl_wikipedia']:.3f} "
              f"austen={ppl['ppl_austen']:.3f}  objective/init={row['objective_vs_init']:.4f}  ({kinds_text})",
              flush=True)
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
