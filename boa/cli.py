"""`boa quantize | eval | quantize-vision | ...`: parse arguments, build a config, call the functions `import boa`
offers."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from boa.algorithms import REGISTRY, Aespa
from boa.algorithms.aespa import INITS
from boa.algorithms.base import BITS, GRIDS, V_ROW_FACTORS
from boa.core.errors import BoaError
from boa.vision.config import DATA_SOURCES, VISION_METHODS, DistillConfig, ReconstructConfig
from boa_kernels.dispatch import BackendError

EXPORT_FORMATS = ("compressed-tensors", "gptq", "gguf")
STREAM_MODES = ("auto", "always", "never")
OFFLOADS = ("auto", "device", "cpu", "disk")  # boa.pipeline.OFFLOADS (importing boa.pipeline would slow --help 3x)


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpora", default="wikipedia,austen", help="evaluation corpora, comma-separated ('' for none)")
    p.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window length")
    p.add_argument("--eval-windows", type=int, default=64, help="windows per corpus (0: the whole held-out text)")
    p.add_argument("--tasks", default="", help="lm-eval-harness tasks, comma-separated (needs boa[eval] and network)")
    p.add_argument("--json", type=Path, help="also write the report here as JSON")


def _add_allow_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read a model folder that holds only pickle weights (pytorch_model.bin); "
                        "only for folders you trust")


def _add_vision_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-images", type=int, default=0,
                   help="evaluate on the first N images (0: all: the Fashion-MNIST test set, or the bundled photos)")
    p.add_argument("--json", type=Path, help="also write the report here as JSON")


def _add_quantize(sub) -> None:
    """`boa quantize`: the method, its grid and knobs, calibration, output."""
    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("model", help="built-in name (smollm2-135m), model folder or hub id")
    q.add_argument("--method", choices=list(REGISTRY), default="gptq")
    q.add_argument("--bits", type=int, default=4, help=f"one of {BITS}")
    q.add_argument("--group-size", type=int, default=128, help="-1 for per-channel grids")
    q.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    q.add_argument("--grid", metavar="{" + ",".join(GRIDS) + ",gguf:TYPE[:SEARCH]}",
                   help="grid search (default: minmax for rtn/gptq, hessian-fast for boa/turboboa/aespa); gguf:TYPE "
                        "(e.g. gguf:Q4_0, gguf:Q3_K:hessian) keeps every grid to one a GGUF type holds (its bits and "
                        "block size too), for `boa export --format gguf`")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction,
                   help="columns by decreasing diag(H) (default: on for turboboa and aespa's turboboa init, else off)")
    q.add_argument("--static-groups", action=argparse.BooleanOptionalAction,
                   help="group grids fixed before the solve (default: off; turboboa: on when act-order meets groups)")
    q.add_argument("--percdamp", type=float, default=0.01)
    q.add_argument("--damp-reference", choices=["mean", "median"],
                   help="damping is --percdamp times the mean (default) or the median of diag(H); median for models "
                        "with a few massive activation channels")
    t = q.add_argument_group("BoA / TurboBoA (defaults follow --method: boa N=1; turboboa N=16, dX 0.25, 1 sweep)")
    t.add_argument("--rows-per-step", type=int, help="N rows of a head quantized jointly (1 = BoA)")
    t.add_argument("--dx-alpha", type=float, help="weight of the earlier layers' error term (0 = off; TurboBoA's "
                   "0.25 by default, 0 with --a-bits 4, where it was measured to cost accuracy)")
    t.add_argument("--dx-windows", type=int, help="the dX term from the first this many calibration windows (whole "
                   "batches of 8; default 0: all): the FP path's forwards and memory shrink with it")
    t.add_argument("--refine-iters", type=int, help="scale-refinement sweeps after rounding (0 = off)")
    t.add_argument("--v-row-factor", choices=V_ROW_FACTORS, default="exact",
                   help="v_proj row factor: W_o,hᵀW_o,h (exact) or identity (the public code)")
    t.add_argument("--row-order", action="store_true", help="rows of each head by decreasing diag(H_out)")
    a = q.add_argument_group("aespa (learned rounding on the same statistics; N/dX/refinement follow --init)")
    a.add_argument("--init", choices=INITS, help="the method whose rounding aespa starts from (default turboboa)")
    a.add_argument("--rounding-iters", type=int, default=Aespa.rounding_iters, help="Adam steps per layer")
    a.add_argument("--rounding-lr", type=float, default=Aespa.rounding_lr, help="Adam learning rate")
    o = q.add_argument_group("rotations and activation quantization (QuaRot; RMSNorm models)")
    o.add_argument("--rotate", action="store_true",
                   help="a random Hadamard rotation (seeded by --seed) of the residual stream, Hadamards per value "
                        "head and before down_proj, fused into the weights; the saved model stays in boa's format")
    o.add_argument("--no-online-down", action="store_true",
                   help="with --rotate: no run-time Hadamard before down_proj (its input keeps its outliers)")
    o.add_argument("--a-bits", type=int, choices=(4, 8, 16), default=16,
                   help="inputs of every quantized linear quantized per token at run time (16: not quantized)")
    o.add_argument("--a-clip", type=float, default=0.9, help="with --a-bits: the clip ratio of each token's range")
    o.add_argument("--a-float-stats", action="store_true",
                   help="with --a-bits: gather the statistics from float activations (QuaRot's order) instead of "
                        "the quantized ones the layers will see")
    o.add_argument("--kv-bits", type=int, choices=(4, 8, 16), default=16,
                   help="keys and values quantized per head and token, after a Hadamard on queries and keys")
    o.add_argument("--kv-clip", type=float, default=0.95, help="with --kv-bits: the clip ratio of each vector's range")
    m = q.add_argument_group("mixed precision (each layer's width chosen to a size budget)")
    m.add_argument("--target-bits", type=float,
                   help="average bits a quantized weight, scales and zeros included, as boa saves it (e.g. 3.0): "
                        "each layer gets one of --widths, chosen from its measured loss at each (a knapsack); "
                        "--bits/--group-size are then only the method's default")
    m.add_argument("--widths", default="3,3g128,4,4g128",
                   help="the widths to choose from: BITS (per-channel) or BITSgGROUP, comma-separated (2-bit ones, "
                        "e.g. 2g64, for budgets under 3 bits: around 3 they were measured to cost more than they "
                        "save)")
    m.add_argument("--untied-widths", action="store_true",
                   help="a width per layer even where servers fuse layers (q/k/v, gate/up, an MoE block's experts: "
                        "by default they share one, so that exports load in vLLM)")
    m.add_argument("--probe-windows", type=int, default=2,
                   help="calibration windows on which each layer's effect on the model's output (KL) is measured, "
                        "scaling its objective (0: objectives alone)")
    q.add_argument("--calib", default="wikipedia", help="corpus: wikipedia, a .txt/.jsonl file, wikitext2, c4")
    q.add_argument("--nsamples", type=int, default=128)
    q.add_argument("--seqlen", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--hessian-dtype", choices=("float32", "float64"), default="float32")
    q.add_argument("--cache-dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    r = q.add_argument_group("where the work runs (models larger than memory: --stream)")
    r.add_argument("--device", help="where each block is quantized: cpu, cuda, cuda:N (default: a GPU if there is one)")
    r.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="the weights' dtype while quantizing (auto: the checkpoint's own); statistics and solves "
                        "run in --hessian-dtype whatever it is")
    r.add_argument("--stream", choices=STREAM_MODES, default="auto",
                   help="read each block from the checkpoint's shards when it is quantized and drop it after, so "
                        "memory holds one block (auto: when the weights would take over half the free memory; "
                        "needs --out and a local safetensors folder)")
    r.add_argument("--offload", choices=OFFLOADS, default="auto",
                   help="where the calibration activations are kept: device, cpu (host memory), disk, or auto (the "
                        "first they fit in)")
    r.add_argument("--offload-dir", type=Path, help="folder for --offload disk (default: $BOA_CACHE/activations)")
    r.add_argument("--nproc", type=int, default=1,
                   help="processes sharing the work (torch.distributed: one per GPU, or CPU processes with gloo); "
                        "the same as launching `torchrun --nproc-per-node N -m boa.cli quantize ...`")
    r.add_argument("--max-shard-size", default="5GB", help="the largest weight file --out gets (e.g. 5GB, 500MB)")
    q.add_argument("--out", type=Path, help="save the quantized model here")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished block")
    q.add_argument("--restart", action="store_true", help="discard an interrupted run's checkpoint (OUT.partial)")
    q.add_argument("--eval-fp", action="store_true", help="also evaluate the unquantized model")
    _add_allow_pickle(q)
    _add_eval_args(q)


def _add_eval_commands(sub) -> None:
    """`boa eval`, `prepare`, `kernels`, `export`."""
    e = sub.add_parser("eval", help="perplexity (and lm-eval tasks) of a model or a boa-quantized folder")
    e.add_argument("model", help="built-in name, model folder, hub id, or a folder written by `boa quantize`")
    e.add_argument("--stream", choices=STREAM_MODES, default="auto",
                   help="score a float model's perplexity block by block, each block read from the safetensors "
                        "shards and dropped after, so memory holds one block (auto: when the weights would take "
                        "over half the free memory; needs a local safetensors folder), on a GPU if there is one")
    _add_allow_pickle(e)
    _add_eval_args(e)

    p = sub.add_parser("prepare", help="convert the built-in model, fetch the offline corpora and images, build the kernels")
    p.add_argument("--model", default="smollm2-135m")

    sub.add_parser("kernels", help="build the compiled kernels if needed and show which backend runs on each device")

    x = sub.add_parser("export", help="write a folder saved by `boa quantize` in a format other tools load")
    x.add_argument("model", type=Path, help="a folder written by `boa quantize --out`")
    x.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="compressed-tensors (llm-compressor's pack-quantized, for vLLM and transformers), gptq (v1), "
                        "or gguf (one file for llama.cpp; the model must be quantized with --grid gguf:TYPE)")
    x.add_argument("--out", type=Path, required=True, help="the folder to write (gguf: the .gguf file)")
    x.add_argument("--type", dest="gguf_type",
                   help="gguf: the GGUF type (default: the one the model was quantized for)")
    x.add_argument("--vocab-from", help="gguf: a GGUF file (or built-in model name) whose tokenizer to copy; default: "
                                        "built from the model's BPE tokenizer")
    x.add_argument("--float-type", choices=("f16", "f32", "q8_0"), default="f16",
                   help="gguf: how the matrices left unquantized (embeddings, an untied head) are stored; q8_0 rounds "
                        "them as llama.cpp's own files hold them (faster there; no longer exactly boa's)")
    x.add_argument("--max-shard-size", default="5GB",
                   help="the largest weight file (e.g. 5GB, 500MB); past it, shards with the Hugging Face index")


def _add_vision_commands(sub) -> None:
    """`boa quantize-vision` and `boa eval-vision` (the CNN path)."""
    v = sub.add_parser("quantize-vision", help="quantize a BatchNorm CNN (Genie: zero-shot from distilled images)")
    v.add_argument("model", help="built-in CNN: fmnist-resnet (train it with bench/train_fmnist.py) or efficientnet-lite0")
    v.add_argument("--method", choices=VISION_METHODS, default="genie-m",
                   help="genie-m: block reconstruction with learned steps and rounding; rtn: round to nearest")
    v.add_argument("--data", choices=DATA_SOURCES, default="genie",
                   help="calibration images: genie (distilled from BN statistics, zero-shot), real, noise")
    v.add_argument("--w-bits", type=int, default=4, help="weights of every layer but the first and last (8 bits)")
    v.add_argument("--a-bits", type=int, default=4, help="inputs of every layer but the first two and last")
    v.add_argument("--images", type=int, default=1024, help="calibration images")
    v.add_argument("--iters", type=int, default=ReconstructConfig.iters, help="Genie-M steps per block")
    v.add_argument("--batch-size", type=int, default=ReconstructConfig.batch_size, help="Genie-M batch")
    v.add_argument("--distill-iters", type=int, default=DistillConfig.iters, help="Genie-D steps per batch")
    v.add_argument("--distill-batch", type=int, default=DistillConfig.batch_size, help="Genie-D batch")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", type=Path, help="save the quantized network here")
    v.add_argument("--restart", action="store_true", help="discard an interrupted run's checkpoint (OUT.partial)")
    v.add_argument("--resume", action="store_true",
                   help="keep the distilled batches found in OUT.partial from an interrupted run with the same settings")
    _add_vision_eval_args(v)

    ev = sub.add_parser("eval-vision", help="accuracy of a built-in CNN or a folder written by `boa quantize-vision`")
    ev.add_argument("model", help="built-in CNN name or a quantized folder")
    _add_vision_eval_args(ev)


def _add_generate(sub) -> None:
    """`boa generate`."""
    g = sub.add_parser("generate", help="stream text from a boa-quantized folder (packed kernels) or any model")
    g.add_argument("model", help="a folder written by `boa quantize --out`, or a built-in name / model folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--engine", choices=("auto", "boa", "transformers"), default="auto",
                   help="boa: boa's own decode loop (Llama, Mistral, Qwen2; static KV cache, q/k/v and gate/up one "
                        "call each); transformers: the model's own forward; auto: boa's where it runs the model")
    g.add_argument("--head-bits", type=int, choices=(8, 4),
                   help="boa's loop runs the output head rounded to these bits and packed (groups of 32), as llama.cpp "
                        "files hold it: faster on small models, logits no longer exactly the model's")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="activations and unquantized weights (default: the model's; bfloat16 halves the "
                        "embedding/head traffic and takes the packed kernels' single-product bf16 path)")
    g.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    _add_allow_pickle(g)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boa", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every layer's loss")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_quantize(sub)
    _add_eval_commands(sub)
    _add_vision_commands(sub)
    _add_generate(sub)
    return parser


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _eval_corpora(args) -> list[str]:
    return [c for c in args.corpora.split(",") if c]


def _check_eval_args(args) -> None:
    """The evaluation flags, before anything is loaded: --eval-windows, --eval-seqlen, and each --corpora name (a
    bad one fails now, not after minutes of quantization)."""
    from boa.data import check_corpus

    if args.eval_windows < 0:
        raise BoaError(f"--eval-windows {args.eval_windows}: give a positive number of windows per corpus, or 0 for "
                       "the whole held-out text")
    if args.eval_seqlen <= 0:
        raise BoaError(f"--eval-seqlen {args.eval_seqlen}: give a positive window length in tokens (default 512)")
    for corpus in _eval_corpora(args):
        check_corpus(corpus, "eval")


def _check_positions(model, args, *flags: str) -> None:
    """--seqlen / --eval-seqlen within the model's max_position_embeddings (beyond it OPT fails with an IndexError
    and RoPE models silently extrapolate)."""
    from boa.models.loader import check_seqlen

    for flag in flags:
        if flag != "--eval-seqlen" or _eval_corpora(args):
            check_seqlen(model.config, getattr(args, flag.lstrip("-").replace("-", "_")), flag)


def _evaluate(name, model, tokenizer, args, report) -> None:
    from boa.eval import evaluate_perplexity
    from boa.eval.harness import lm_eval_tasks

    row = {"model": name}
    corpora = _eval_corpora(args)
    with report.phase("eval"):
        row.update(evaluate_perplexity(model, tokenizer, corpora, args.eval_seqlen, args.eval_windows or None,
                                       progress=True))
        if args.tasks:
            for task, metrics in lm_eval_tasks(model, tokenizer, args.tasks.split(",")).items():
                row.update({f"{task}/{k}": v for k, v in metrics.items()})
    report.rows.append(row)


METHOD_FLAGS = ("bits", "group_size", "sym", "grid", "act_order", "static_groups", "percdamp", "damp_reference",
                "rows_per_step", "dx_alpha", "dx_windows", "refine_iters", "v_row_factor", "row_order", "init",
                "rounding_iters", "rounding_lr")


def _method(args):
    """The method config the flags describe (flags a method has no use for are ignored; unset ones take the
    method's defaults)."""
    from boa.algorithms import method_from_dict

    if args.init is not None and args.method != "aespa":
        raise BoaError("--init applies only to --method aespa (it names where learned rounding starts)")
    flags = {k: getattr(args, k) for k in METHOD_FLAGS}
    if flags["grid"] is not None and flags["grid"].startswith("gguf:"):  # gguf:TYPE or gguf:TYPE:SEARCH
        _, flags["gguf"], *search = flags["grid"].split(":")
        flags["grid"] = search[0] if search else None
    if getattr(args, "a_bits", 16) == 4 and flags["dx_alpha"] is None:
        # under 4-bit activations TurboBoA's dX correction costs accuracy (README: rotated SmolLM2 W4A4-KV4)
        flags["dx_alpha"] = 0.0
    return method_from_dict({"method": args.method, **flags})


def _quantize(args, report) -> None:
    from boa import data
    from boa.config import QuantConfig
    from boa.core.output import check_output
    import torch

    from boa.export import MANIFEST, load, save
    from boa.models import load_model, stream_model
    from boa.core.io import cache_dir
    from boa.pipeline import quantize
    from boa.pipeline.mixed import mixed_precision, parse_widths
    from boa.stats.group import MIN_EXPERT_TOKENS
    from boa.transforms import ActivationQuant, KVQuant, QuaRot

    if args.resume and not args.out:
        raise BoaError("--resume continues the run saved under --out; give the same --out as the interrupted run")
    transforms = (QuaRot(seed=args.seed, online_down=not args.no_online_down),) if args.rotate else ()
    if args.a_bits != 16:
        transforms += (ActivationQuant(bits=args.a_bits, clip_ratio=args.a_clip, calibrate=not args.a_float_stats),)
    if args.kv_bits != 16:
        transforms += (KVQuant(bits=args.kv_bits, clip_ratio=args.kv_clip),)
    config = QuantConfig(_method(args), hessian_dtype=args.hessian_dtype, cache_dtype=args.cache_dtype,
                         transforms=transforms)
    method = config.method
    calibrated = method.needs().hessian or args.target_bits is not None  # RTN reads no calibration text
    widths = parse_widths(args.widths) if args.target_bits is not None else None  # bad widths fail before any work
    if calibrated:
        if args.nsamples <= 0:
            raise BoaError(f"--nsamples {args.nsamples}: give a positive number of calibration windows")
        if args.seqlen <= 0:
            raise BoaError(f"--seqlen {args.seqlen}: give a positive calibration window length in tokens")
        data.check_corpus(args.calib, "calib")
    _check_eval_args(args)
    if args.out:  # the cheap part of the output check, before minutes of work (quantize checks the rest)
        check_output(args.out, MANIFEST, writer="boa quantize")
    from boa.core.ranks import init_from_environment, local_device

    device = local_device(_run_device(args.device))
    ranks = init_from_environment(device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    stream = _should_stream(args, dtype)
    with report.phase("load"):
        if stream:
            model, tokenizer, adapter = stream_model(args.model, dtype, device)
        else:
            model, tokenizer, adapter = load_model(args.model, dtype, allow_pickle=args.allow_pickle)
    _check_positions(model.model if stream else model, args, *(["--seqlen"] if calibrated else []), "--eval-seqlen")
    calib = None
    if calibrated:
        with report.phase("calibration data"):
            calib = data.calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
    if args.eval_fp:
        if stream and args.tasks:
            raise BoaError("--eval-fp with --stream scores the float model's perplexity block by block; lm-eval "
                           "--tasks need it in memory: drop --tasks, or use --stream never where it fits")
        _evaluate("fp", model, tokenizer, args, report)
    if widths is not None:
        with report.phase("measure widths"):
            mixed = mixed_precision(model, calib, config, args.target_bits, widths, tied=not args.untied_widths,
                                    probe_windows=args.probe_windows, device=device,
                                    offload=args.offload, offload_dir=args.offload_dir, cache=cache_dir("widths"))
        config = mixed.config
        report.info["mixed_precision"] = {"target_bits": args.target_bits, "bits": mixed.bits,
                                          "layers": mixed.summary(), "widths": mixed.chosen}
        print(f"widths for {args.target_bits} bits a weight: {mixed.bits:.4f} stored; layers per width "
              f"{mixed.summary()}", file=sys.stderr)
    with report.phase("quantize"):
        result = quantize(model, config, calib, adapter=adapter, device=device, offload=args.offload,
                          offload_dir=args.offload_dir, out=args.out, resume=args.resume, restart=args.restart)
    if not ranks.main:  # rank 0 saves and evaluates
        return
    if result.calibration is not None:
        result.calibration.update(corpus=args.calib, seed=args.seed)
    if args.out:
        with report.phase("save"):
            save(result, args.out, tokenizer, max_shard_size=args.max_shard_size)
        print(f"saved to {args.out}", file=sys.stderr)
    report.info["config"] = config.to_dict()
    report.info["calibration"] = result.calibration
    if result.expert_tokens:  # MoE: the calibration tokens each expert's statistics came from
        report.info["expert_tokens"] = result.expert_tokens
        starved = sorted(n for n, count in result.expert_tokens.items() if count < MIN_EXPERT_TOKENS)
        if starved:
            print(f"{len(starved)} expert layers saw fewer than {MIN_EXPERT_TOKENS} calibration tokens and were "
                  f"solved with their block's pooled Hessian (e.g. {starved[0]})", file=sys.stderr)
    if stream:
        if not _eval_corpora(args) and not args.tasks:
            return
        with report.phase("load"):  # the streamed model holds no weights: evaluate what was saved
            model, tokenizer, _ = load(args.out, device)
    label = method.label if widths is None else f"{method.name} {mixed.bits:.2f} bits mixed"
    _evaluate(label, model, tokenizer, args, report)


def _run_device(device: str | None):
    """--device, checked, or a GPU if there is one."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    return torch.device(device)


def _should_stream(args, dtype) -> bool:
    """--stream: always / never, or auto: when the weights at the run's dtype would take over half the free host
    memory (and, to quantize, there is an --out to keep the codes in)."""
    from boa.models.weights import weights_bytes
    from boa.pipeline.offload import host_free_memory

    keeps_codes = args.command == "quantize"  # `boa eval` keeps nothing
    if args.stream == "never":
        return False
    if args.stream == "always":
        if keeps_codes and not args.out:
            raise BoaError("--stream keeps each block's codes in the run's checkpoint beside --out until they are "
                           "saved; give --out")
        return True
    if keeps_codes and not args.out:
        return False
    needed, free = weights_bytes(args.model, dtype), host_free_memory()
    return needed is not None and free is not None and needed > free / 2


def _load_any(name: str, report, allow_pickle: bool = False):
    """(model, tokenizer) of a folder written by `boa quantize` or of any model `load_model` takes; a folder saved
    without a tokenizer is refused (evaluation and generation need one)."""
    from boa.export import load, read_manifest
    from boa.models import load_model

    with report.phase("load"):
        if Path(name).is_dir() and read_manifest(name) is not None:
            model, tokenizer, _ = load(name)
        else:
            model, tokenizer, _ = load_model(name, allow_pickle=allow_pickle)
    if tokenizer is None:
        raise BoaError(f"{name} was saved without a tokenizer; copy the original model's tokenizer files "
                       "(tokenizer.json, tokenizer_config.json) into it, or save with boa.save(result, folder, "
                       "tokenizer)")
    return model, tokenizer


def _eval(args, report) -> None:
    from boa.export import read_manifest
    from boa.models import stream_model

    _check_eval_args(args)
    quantized = Path(args.model).is_dir() and read_manifest(args.model) is not None
    if quantized and args.stream == "always":
        raise BoaError(f"{args.model} is a boa-quantized folder, which is evaluated in memory (its weights are "
                       "packed); --stream is for float models: drop it")
    if not quantized and _should_stream(args, None):
        if args.tasks:
            raise BoaError("--stream scores perplexity block by block; lm-eval --tasks need the model in memory: "
                           "drop --tasks, or use --stream never where it fits")
        with report.phase("load"):
            model, tokenizer, _ = stream_model(args.model, device=_run_device(None))
        _check_positions(model.model, args, "--eval-seqlen")
        _evaluate(args.model, model, tokenizer, args, report)
        return
    model, tokenizer = _load_any(args.model, report, args.allow_pickle)
    _check_positions(model, args, "--eval-seqlen")
    _evaluate(args.model, model, tokenizer, args, report)


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise BoaError(f"--device {device!r} is not a device; use cpu or cuda (cuda:N)") from None
    if parsed.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise BoaError(f"--device {device}: no CUDA GPU is available here (torch {torch.__version__}"
                       f"{'' if torch.version.cuda else ', built without CUDA'}); use --device cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise BoaError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _generate(args, report) -> None:
    import torch

    from boa.generate import check_sampling, generate

    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    if not args.prompt:
        raise BoaError("--prompt is empty; give some text to continue")
    _check_device(args.device)
    model, tokenizer = _load_any(args.model, report, args.allow_pickle)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)

    def stream(piece: str) -> None:
        print(piece, end="", flush=True)

    print(args.prompt, end="", flush=True)
    result = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                      stream=stream, engine=args.engine, head_bits=args.head_bits)
    print()
    print(f"prompt {result.prompt_tokens} tokens in {result.prefill_seconds:.2f} s; {len(result.tokens)} new tokens, "
          f"decode {result.tok_s:.1f} tok/s ({args.device}, {torch.get_num_threads()} threads); KV cache "
          f"{result.cache_bytes / 2**20:.2f} MiB", file=sys.stderr)


def _prepare(args, report) -> None:
    from boa.data import corpus_text
    from boa.models import model_folder
    from boa.vision.images import fashion_mnist

    with report.phase("prepare"):
        print(f"model {args.model}: {model_folder(args.model)}")
        for corpus, split in (("wikipedia", "calib"), ("wikipedia", "eval"), ("austen", "eval")):
            print(f"corpus {corpus}/{split}: {len(corpus_text(corpus, split)):,} characters")
        print(f"images fashion-mnist: {len(fashion_mnist('train')[0]):,} train, {len(fashion_mnist('test')[0]):,} test")
    _kernels(args, report)


def _export(args, report) -> None:
    from boa.export import export_compressed_tensors, export_gptq, load
    from boa.nn import QuantLinear

    with report.phase("load"):
        model, tokenizer, config = load(args.model)
    layers = {name: m.quantized_weight() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    with report.phase("export"):
        if args.format == "gguf":
            from boa.export import export_gguf
            from boa.models.loader import BUILTIN_MODELS

            kind = args.gguf_type or getattr(config.method, "gguf", None)
            if kind is None:
                raise BoaError(f"{args.model} was not quantized on GGUF grids; quantize it with --grid gguf:TYPE "
                               "(e.g. gguf:Q4_0), then export")
            vocab = args.vocab_from
            if vocab in BUILTIN_MODELS:
                vocab = BUILTIN_MODELS[vocab].gguf_path()
            export_gguf(model, layers, args.out, kind, tokenizer, config, vocab_from=vocab,
                        float_type=args.float_type)
        else:
            exporter = {"compressed-tensors": export_compressed_tensors, "gptq": export_gptq}[args.format]
            exporter(model, layers, args.out, tokenizer, config, max_shard_size=args.max_shard_size)
    print(f"exported {args.model} as {args.format} to {args.out}", file=sys.stderr)


def _kernels(args, report) -> None:
    import torch

    from boa_kernels import backend_for
    from boa_kernels.loader import load_cpu, load_cuda

    cpu = load_cpu()
    print(f"C++ CPU kernels: {f'built for {cpu.packed_isa()}' if cpu is not None else 'not available (torch runs instead)'}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        print(f"CUDA kernels: {'built' if load_cuda() is not None else 'not available'}")
    for device in devices:
        print(f"{device}: the column pass and packed GEMV run on {backend_for(device)} "
              "(override with BOA_KERNELS=torch|cpp|triton|cuda)")


def _vision_eval_set(spec, args):
    from boa.vision.images import evaluation_images

    images, labels = evaluation_images(spec)
    if args.eval_images:
        images = images[: args.eval_images]
        labels = None if labels is None else labels[: args.eval_images]
    return images, labels


def _vision_row(name, model, images, labels, reference, report):
    """Appends the model's report row; returns its logits (the reference for the quantized rows)."""
    from boa.vision.evaluate import classifier_metrics, logits_of

    with report.phase("eval"):
        logits = logits_of(model, images)
    report.rows.append({"model": name, **classifier_metrics(logits, labels, reference)})
    return logits


def _quantize_vision(args, report) -> None:
    from boa.vision import VisionQuantConfig, load_vision_model, quantize_vision, save_vision

    config = VisionQuantConfig(method=args.method, data=args.data, n_images=args.images, w_bits=args.w_bits,
                               a_bits=args.a_bits, seed=args.seed,
                               distill=DistillConfig(iters=args.distill_iters, batch_size=args.distill_batch),
                               reconstruct=ReconstructConfig(iters=args.iters, batch_size=args.batch_size))
    config.validate()  # bad bits fail before loading anything
    with report.phase("load"):
        model, spec = load_vision_model(args.model)
        images, labels = _vision_eval_set(spec, args)
    # quantize_vision checks --out (and --resume) before any work, and keeps Genie-D's batches in OUT.partial
    result = quantize_vision(model, spec, config, out=args.out, resume=args.resume, restart=args.restart)
    for phase, seconds in result.seconds.items():
        report.seconds[phase] = seconds
    reference = _vision_row("fp", model, images, labels, None, report)
    tag = f"{config.method} W{config.w_bits}A{config.a_bits} ({config.data})"
    _vision_row(tag, result.model, images, labels, reference, report)
    report.info["config"] = config.to_dict()
    if args.out:
        with report.phase("save"):
            save_vision(result, args.out, report={"results": report.rows})  # removes OUT.partial once written
        print(f"saved to {args.out}", file=sys.stderr)


def _eval_vision(args, report) -> None:
    from boa.vision import load_vision, load_vision_model
    from boa.vision.format import MANIFEST

    with report.phase("load"):
        if (Path(args.model) / MANIFEST).exists():
            model, spec, manifest = load_vision(args.model)
            fp, _ = load_vision_model(manifest["model"])
        else:
            model, spec = load_vision_model(args.model)
            fp = None
        images, labels = _vision_eval_set(spec, args)
    reference = None if fp is None else _vision_row("fp", fp, images, labels, None, report)
    _vision_row(args.model, model, images, labels, reference, report)


def _after_interrupt(args) -> str:
    """What an interruption kept, and how to go on."""
    if args.command not in ("quantize", "quantize-vision"):
        return "Nothing was written."
    if not args.out:
        return "Nothing was kept: with --out, finished work is checkpointed and --resume continues it."
    from boa.core.checkpoint import Checkpoint
    from boa.core.output import partial_folder

    partial = partial_folder(args.out)
    done = Checkpoint.steps_done(partial) if partial.is_dir() else 0
    if not done:
        return "No step had finished yet; rerun the same command to start again."
    unit = "blocks" if args.command == "quantize" else "Genie-D batches"
    return f"{done} finished {unit} are kept in {partial}; rerun the same command with --resume to continue."


def _launch(nproc: int, argv: list[str]) -> int:
    """`boa quantize --nproc N ...` as `torchrun --standalone --nproc-per-node N -m boa.cli quantize ...`."""
    import subprocess

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "boa.cli", *rest]
    return 2 if subprocess.run(command).returncode else 0


def _check_nproc(args) -> None:
    if args.nproc < 1:
        raise BoaError(f"--nproc {args.nproc}: give 1 or more processes")
    if args.nproc > args.nsamples:
        raise BoaError(f"--nproc {args.nproc} is more processes than calibration windows (--nsamples "
                       f"{args.nsamples}); every process needs at least one window")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv=None) -> int:
    from boa.eval import Report

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    report = Report()
    if args.command == "quantize":
        try:
            _check_nproc(args)
        except BoaError as err:
            print(f"boa: error: {err}", file=sys.stderr)
            return 2
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            return _launch(args.nproc, argv)
    try:
        {"quantize": _quantize, "eval": _eval, "prepare": _prepare, "kernels": _kernels,
         "export": _export, "generate": _generate, "quantize-vision": _quantize_vision,
         "eval-vision": _eval_vision}[args.command](args, report)
    except (BoaError, BackendError) as err:
        print(f"boa: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"boa: stopped (interrupted). {_after_interrupt(args)}", file=sys.stderr)
        return 2
    if args.command not in ("prepare", "kernels", "export", "generate") and _rank() == 0:
        report.print()
        if args.json:
            report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
