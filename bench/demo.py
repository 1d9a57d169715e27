"""`make demo`: quantize the packaged SmolLM2-135M with RTN, GPTQ (its defaults, and the strongest configuration a
GPTQ user can set: act-order and the H-weighted grid, `gptq-strong`) and TurboBoA at W3 per-channel, and print their
perplexity on held-out Wikipedia and on Jane Austen, the time each took, and each method's perplexity excess over FP
divided by the strongest GPTQ's (÷strong: below 1 is better than it).

The demo calibrates on fewer windows than boa's default (128 × 512) so that it fits in about a quarter of an hour
on 2 CPU cores; `boa quantize smollm2-135m ...` uses the default. bench/quality.py runs the full table.
"""
from __future__ import annotations

import argparse
import copy
import time

import boa
from boa.eval import EVAL_CORPORA, Report, evaluate_perplexity

from _common import STRONG_GPTQ, excess_ratio, machine, parse_methods, parse_settings  # bench/: sys.path[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--eval-windows", type=int, default=16, help="evaluation windows of 512 tokens per corpus")
    parser.add_argument("--settings", default="w3", help="comma-separated wBITS[gGROUP]")
    parser.add_argument("--methods", default=f"rtn,gptq,{STRONG_GPTQ},turboboa",
                        help="comma-separated methods (with :key=value overrides, as bench/quality.py takes)")
    parser.add_argument("--json", help="also write the table as JSON")
    args = parser.parse_args()

    report = Report()
    report.info.update(machine())
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
    fp = report.rows[0]
    for setting in parse_settings(args.settings):
        strong = None
        for entry in parse_methods(args.methods):
            model = copy.deepcopy(fp_model)
            start = time.perf_counter()
            with report.phase(f"quantize {entry.entry}"):
                boa.quantize(model, entry.config(setting), calib, adapter=adapter, progress=True)
            evaluate(f"{entry.entry} {setting.label}", model, time.perf_counter() - start)
            strong = report.rows[-1] if entry.entry == STRONG_GPTQ else strong
        rows = report.rows[-len(parse_methods(args.methods)):]
        for row in rows if strong else []:
            row.update({f"÷strong {c}": excess_ratio(row, strong, fp, c) for c in EVAL_CORPORA})
    print()
    report.print()
    if args.json:
        report.write(args.json)


if __name__ == "__main__":
    main()
