"""Quality / speed benchmark: perplexity and quantization time of each method at each weight setting.

    python bench/quality.py --model smollm2-135m --methods fp,rtn,gptq,gptq-strong,boa,turboboa,aespa --settings w4g128,w3,w2g64 \\
        --json bench/results/quality.json [--plot bench/results/quality.png] [--resume]

What it measures. The model is loaded once and one set of calibration windows (`--nsamples` × `--seqlen` tokens
of Wikipedia, at offsets seeded by `--calib-seed`) is drawn and shared by every method, so methods differ only in how
they round. For each setting × method a fresh copy of the FP model is quantized with boa.quantize (the reported
seconds cover that call only: no loading, no evaluation) and scored by perplexity on `--eval-windows` held-out
windows of 512 tokens of Wikipedia and of Jane Austen (boa.eval.evaluate_perplexity). "fp" is the unquantized
model, scored once.

Defaults. boa's own default calibration is 128 × 512; here it is 32 × 512 and 16 evaluation windows per corpus,
so that the full table (fp, rtn, gptq, boa, turboboa, aespa at w4g128, w3, w2g64) fits in about two hours on 2 CPU
cores (aespa, with TurboBoA as its init and 500 learned-rounding steps per layer, is half of it).
Compare numbers only between runs with the same --nsamples/--seqlen/--eval-windows (they are in the JSON).

Settings. wBITS[gGROUP] for the weights, then aBITS for the linears' inputs quantized per token at run time and
kvBITS for the KV cache (boa.transforms): w4g128, w3, w4a8, w4a4kv4, w8a8.

Methods. A method entry may carry overrides after colons, e.g. `turboboa:rows_per_step=4:refine_iters=0`,
`rtn:grid=mse` or `aespa:init=gptq:rounding_iters=200`: the method's own settings (boa.TurboBoA's fields; aespa's and
its init's), the run options hessian_dtype, cache_dtype, true_sequential, rotate=true (QuaRot, seed 0, before the
method), or target_bits=3.0 (mixed precision: per-layer widths chosen around the setting's for that average size,
boa.pipeline.mixed; its seconds include measuring them, and the row adds stored_bits and layers_per_width) (values are read as int, then float, then true/false, else string). The JSON keeps the whole
entry string as the row's "method", so several variants of one method can be compared in one run.

Output. The JSON is rewritten (atomically) after every finished row, so an interrupted run keeps what it finished;
`--resume` then skips the rows already in the file (same method string, bits and group size). At the end a table
prints perplexity, the excess over FP in % per corpus, that excess divided by the strongest GPTQ's (`gptq-strong`:
act-order, H-weighted grid, static groups when grouped — where that entry ran), seconds and seconds relative to gptq
of the same setting,
and a PNG (one panel per corpus, perplexity on a log scale against the setting) is drawn if matplotlib is installed.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

import boa
from boa.core.io import atomic_file
from boa.eval import EVAL_CORPORA, evaluate_perplexity

from _common import (  # bench/ is on sys.path
    FP, STRONG_GPTQ, Setting, excess_ratio, machine, parse_methods, parse_settings, planned_config,
)

FP_SETTING = Setting(16, -1)
HEADER_KEYS = ("model", "nsamples", "seqlen", "calib_seed", "eval_windows")  # must match for --resume to reuse rows


def row_key(row: dict) -> tuple:
    return row["method"], Setting.of_row(row)


def write_results(path: Path, data: dict) -> None:
    """Temporary file beside `path`, then os.replace: the file is always a whole, valid JSON."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def load_previous(path: Path, header: dict) -> list[dict]:
    """The rows of an earlier run in `path` (for --resume), refusing a file made with other settings."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    data.setdefault("calib_seed", 0)   # files written before --calib-seed existed used seed 0
    mismatch = {k: (data.get(k), header[k]) for k in HEADER_KEYS if data.get(k) != header[k]}
    if mismatch:
        detail = ", ".join(f"{k}: file {old!r} vs now {new!r}" for k, (old, new) in mismatch.items())
        raise SystemExit(f"--resume: {path} was made with other settings ({detail}); use another --json")
    if data.get("threads") != header["threads"]:
        print(f"note: {path} was timed with {data.get('threads')} threads, this run uses {header['threads']}; "
              "seconds are not comparable across them")
    return list(data.get("results", []))


def format_row(row: dict) -> str:
    ppl = " ".join(f"{k}={row[k]:.3f}" for k in row if k.startswith("ppl_"))
    label = "" if row["method"] == FP else " " + Setting.of_row(row).label
    return f"{row['method']}{label}: {ppl} seconds={row['seconds']:.1f}"


def print_table(rows: list[dict], corpora: list[str]) -> None:
    """method, setting, ppl per corpus, excess over FP in % per corpus, the excess over gptq-strong's (same setting,
    where it ran), seconds, seconds / gptq's (same setting)."""
    fp = next((r for r in rows if r["method"] == FP), None)
    gptq = {}
    for r in rows:   # the plain "gptq" entry if present, else the first gptq variant
        if r["method"] == "gptq" or (r["method"].split(":")[0] == "gptq" and Setting.of_row(r) not in gptq):
            gptq[Setting.of_row(r)] = r["seconds"]
    strong = {Setting.of_row(r): r for r in rows if r["method"] == STRONG_GPTQ}
    header = ["method", "setting", *(f"ppl {c}" for c in corpora)]
    header += [f"+% {c}" for c in corpora] + [f"÷ strong {c}" for c in corpora if strong]
    header += ["seconds"] + (["× gptq"] if gptq else [])
    table = []
    for r in rows:
        line = [r["method"], "-" if r["method"] == FP else Setting.of_row(r).label]
        line += [f"{r[f'ppl_{c}']:.3f}" for c in corpora]
        line += [f"{100 * (r[f'ppl_{c}'] / fp[f'ppl_{c}'] - 1):+.1f}" if fp else "" for c in corpora]
        if strong:
            ratios = [excess_ratio(r, strong.get(Setting.of_row(r)), fp, c) if r["method"] != FP else None
                      for c in corpora]
            line += ["" if x is None else f"{x:.2f}" for x in ratios]
        line.append(f"{r['seconds']:.1f}")
        if gptq:
            ref = gptq.get(Setting.of_row(r))
            line.append(f"{r['seconds'] / ref:.2f}" if ref and r["method"] != FP else "")
        table.append(line)
    widths = [max(len(h), *(len(line[i]) for line in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for line in table:
        print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))))


def plot(rows: list[dict], corpora: list[str], settings: list[Setting], path: Path, title: str) -> None:
    """One panel per corpus: perplexity (log) against the setting, a line per method, FP dashed."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed (pip install matplotlib); no plot drawn")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    def plain(value, _pos):   # 20, 50, 100, ... rather than 2×10^1
        return f"{value:g}"

    def plain_2_5(value, _pos):   # minor ticks: label only the 2s and 5s of each decade
        return f"{value:g}" if value > 0 and round(value / 10 ** math.floor(math.log10(value)), 6) in (2, 5) else ""

    labels = [s.label for s in settings]
    fp = next((r for r in rows if r["method"] == FP), None)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != FP))
    by_key = {row_key(r): r for r in rows}
    fig, axes = plt.subplots(1, len(corpora), figsize=(5.5 * len(corpora), 4.2), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for method in methods:
            ys = [by_key.get((method, s), {}).get(f"ppl_{corpus}", math.nan) for s in settings]
            ax.plot(labels, ys, marker="o", label=method)
        if fp:
            ax.axhline(fp[f"ppl_{corpus}"], color="black", linestyle="--", linewidth=1, label="fp")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(plain))
        ax.yaxis.set_minor_formatter(FuncFormatter(plain_2_5))
        ax.set_title(corpus)
        ax.set_xlabel("setting")
        ax.set_ylabel("perplexity")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a name or path for boa.load_model")
    parser.add_argument("--methods", default="fp,rtn,gptq,gptq-strong,boa,turboboa,aespa",
                        help="comma-separated methods, each optionally with :key=value overrides of its settings")
    parser.add_argument("--settings", default="w4g128,w3,w2g64", help="comma-separated wBITS[gGROUP][aBITS][kvBITS]")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (shared by every method)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--calib-seed", type=int, default=0,
                        help="seed of the calibration windows' offsets: rerun with 1, 2, ... to see a difference's "
                             "noise")
    parser.add_argument("--eval-windows", type=int, default=16, help="evaluation windows of 512 tokens per corpus")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json", required=True, help="results file, rewritten after every finished row")
    parser.add_argument("--plot", help="PNG path (default: the --json path with .png)")
    parser.add_argument("--no-plot", action="store_true", help="draw no plot")
    parser.add_argument("--resume", action="store_true", help="skip the rows already in the --json file")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = parse_settings(args.settings)
    entries = parse_methods(args.methods)
    quantized = [e for e in entries if e.method != FP]
    for entry in quantized:   # catch a bad method, setting or override before spending an hour
        for setting in settings:
            entry.config(setting)

    json_path = Path(args.json)
    header = {**machine(), "model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "calib_seed": args.calib_seed, "eval_windows": args.eval_windows, "threads": torch.get_num_threads(),
              "torch": torch.__version__}
    rows = load_previous(json_path, header) if args.resume else []
    done = {row_key(r) for r in rows}
    todo = [(e, FP_SETTING) for e in entries if e.method == FP]
    todo += [(e, setting) for setting in settings for e in quantized]
    pending = [t for t in todo if (t[0].entry, t[1]) not in done]
    if args.resume:
        print(f"--resume: {len(todo) - len(pending)} of {len(todo)} rows already in {json_path}")

    corpora = list(EVAL_CORPORA)
    failed = []
    if pending:
        fp_model, tokenizer, adapter = boa.load_model(args.model)
        calib = None
        if quantized:
            calib = boa.data.calibration_windows(tokenizer, "wikipedia", nsamples=args.nsamples, seqlen=args.seqlen,
                                                 seed=args.calib_seed)
        print(f"{args.model}: calibration {args.nsamples} × {args.seqlen} Wikipedia tokens (shared by every method); "
              f"perplexity on {args.eval_windows} × 512 held-out tokens of {' and '.join(corpora)}; "
              f"torch threads: {torch.get_num_threads()}", flush=True)
        for entry, setting in pending:
            try:
                if entry.method == FP:
                    model, seconds, config = fp_model, 0.0, {}
                else:
                    model = copy.deepcopy(fp_model)
                    start = time.perf_counter()
                    cfg, planned = planned_config(entry, entry.config(setting), model, calib)
                    boa.quantize(model, cfg, calib, adapter=adapter, progress=True)
                    seconds, config = time.perf_counter() - start, cfg.to_dict()
                ppl = evaluate_perplexity(model, tokenizer, max_windows=args.eval_windows)
            except Exception:   # keep going: the other rows are still worth having; this one is retried on --resume
                traceback.print_exc()
                failed.append(entry.entry if entry.method == FP else f"{entry.entry} {setting.label}")
                print(f"FAILED: {failed[-1]}", flush=True)
                continue
            finally:
                model = None
                gc.collect()
            row = {"method": entry.entry, "bits": setting.bits, "group_size": setting.group_size,
                   "a_bits": setting.a_bits, "kv_bits": setting.kv_bits, **ppl, "seconds": seconds, "config": config,
                   **({} if entry.method == FP else planned)}
            rows = [r for r in rows if row_key(r) != row_key(row)] + [row]
            write_results(json_path, {**header, "results": rows})
            print(format_row(row), flush=True)
    elif not rows:
        raise SystemExit("nothing to run")

    # The table and plot cover what this command asked for, in its order (the file may hold more after --resume).
    # FP (the reference for the excess columns) is shown whenever the file has it.
    by_key = {row_key(r): r for r in rows}
    wanted = [(FP, FP_SETTING)] + [(e.entry, s) for e, s in todo if e.method != FP]
    shown = [by_key[k] for k in wanted if k in by_key]
    print()
    print_table(shown, corpora)
    if len(rows) > len(shown):
        print(f"({len(rows) - len(shown)} more rows from earlier runs are in {json_path})")
    print(f"results: {json_path}")
    if not args.no_plot:
        plot_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")
        plot(shown, corpora, settings, plot_path,
             f"{args.model}: {args.nsamples}×{args.seqlen} calibration, {args.eval_windows} eval windows")
    if failed:
        print(f"{len(failed)} row(s) failed: {', '.join(failed)} (rerun with --resume to retry them)")
        sys.exit(1)


if __name__ == "__main__":
    main()
