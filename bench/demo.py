"""`make demo`: quantize the packaged SmolLM2-135M with RTN, GPTQ and TurboBoA at W3 per-channel, and print
FP / RTN / GPTQ / TurboBoA perplexity on held-out Wikipedia and on Jane Austen, with the time each took.

The demo calibrates on fewer windows than boa's default (128 × 512) so that it fits in about a quarter of an hour
on 2 CPU cores; `boa quantize smollm2-135m ...` uses the default. bench/quality.py runs the full table.
"""
from __future__ import annotations

import argparse
import copy
import time

import boa
from boa.algorithms import method_from_dict
from boa.eval import Report, evaluate_perplexity

from _common import parse_settings  # bench/ is sys.path[0] when run as a script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--eval-windows", type=int, default=16, help="evaluation windows of 512 tokens per corpus")
    parser.add_argument("--settings", default="w3", help="comma-separated wBITS[gGROUP]")
    parser.add_argument("--methods", default="rtn,gptq,turboboa", help="comma-separated methods")
    parser.add_argument("--json", help="also write the table as JSON")
    args = parser.parse_args()

    report = Report()
    with report.phase("load"):
        fp_model, tokenizer, adapter = boa.load_model("smollm2-135m")
        calib = boa.data.calibration_windows(tokenizer, "wikipedia", nsamples=args.nsamples, seqlen=512)
    print(f"SmolLM2-135M; every method calibrates on the same {args.nsamples} × 512 Wikipedia tokens; perplexity on "
          f"{args.eval_windows} × 512 held-out tokens per corpus")

    def evaluate(name, model, seconds):
        with report.phase("eval"):
            row = {"model": name, **evaluate_perplexity(model, tokenizer, max_windows=args.eval_windows)}
        report.rows.append({**row, "quantize_s": seconds})
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in report.rows[-1].items()),
              flush=True)

    evaluate("fp32", fp_model, 0.0)
    for setting in parse_settings(args.settings):
        bits, group_size = setting.bits, setting.group_size
        for method in args.methods.split(","):
            model = copy.deepcopy(fp_model)
            config = method_from_dict({"method": method, "bits": bits, "group_size": group_size})
            start = time.perf_counter()
            with report.phase(f"quantize {method}"):
                boa.quantize(model, config, calib, adapter=adapter, progress=True)
            tag = f"{method} {setting.label}"
            evaluate(tag, model, time.perf_counter() - start)
    print()
    report.print()
    if args.json:
        report.write(args.json)


if __name__ == "__main__":
    main()
