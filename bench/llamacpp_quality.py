"""boa's GGUF files in llama.cpp: their perplexity computed by llama.cpp itself beside boa's own evaluation of the
same model, and beside llama.cpp's own quantization of the float model to the same type, with and without an
importance matrix computed on the same calibration text.

    python bench/llamacpp_quality.py --json bench/results/gguf_quality.json [--types Q4_0,Q4_1] \
        [--methods turboboa,gptq] [--nsamples 32] [--eval-windows 16] [--threads 2]

Every perplexity is over the same token windows (boa's held-out Wikipedia / Austen windows of 512 tokens, fed as
token ids to both engines, so tokenization cannot differ). boa: each method quantizes on the type's grids
(`--grid gguf:TYPE`), is evaluated in memory, exported (`boa export --format gguf`, embeddings F16) and evaluated by
llama.cpp. llama.cpp: the float model exported as F32 GGUF, `llama-quantize` to the type (token embedding F16 as in
boa's files), and again with `--imatrix` from `llama-imatrix` on the calibration text (32 chunks of 512 tokens).

llama.cpp comes from the `llama-cpp-python` sdist: its Python package runs the files (the bench's llama.cpp venv,
as bench/peer_llamacpp.py makes it) and its vendored llama.cpp tree builds `llama-quantize` and `llama-imatrix`
(cmake, ~10 CPU-minutes, once, into $BOA_CACHE/llamacpp-tools). ggml's AMX buffer type crashes on Intel AMX
machines: models are loaded with `use_extra_bufts` off.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import boa
from boa.core.io import cache_dir, write_json
from boa.data import corpus_text, eval_tokens
from boa.eval import EVAL_CORPORA, evaluate_perplexity
from boa.eval.perplexity import eval_windows
from boa.export import export_gguf
from boa.models.loader import BUILTIN_MODELS

from _common import machine, side_venv

REQUIREMENT = "llama-cpp-python==0.3.36"

# Runs in the llama.cpp venv: argv = gguf path, windows .npy, threads; prints {"nll": total, "tokens": count}.
NLL_WORKER = r"""
import json, sys, numpy as np, llama_cpp
path, windows, threads = sys.argv[1], np.load(sys.argv[2]), int(sys.argv[3])
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_default_params()
params.use_extra_bufts = False  # ggml's AMX buffer type crashes on Intel AMX machines
model = llama_cpp.llama_model_load_from_file(path.encode(), params)
assert model, path
n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
cparams = llama_cpp.llama_context_default_params()
cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = windows.shape[1]
cparams.n_threads = cparams.n_threads_batch = threads
ctx = llama_cpp.llama_init_from_model(model, cparams)
batch = llama_cpp.llama_batch_init(windows.shape[1], 0, 1)
total, count = 0.0, 0
for window in windows:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    batch.n_tokens = len(window)
    for i, t in enumerate(window):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(t), i, 1, 1
        batch.seq_id[i][0] = 0
    assert llama_cpp.llama_decode(ctx, batch) == 0
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(window), n_vocab)).astype(np.float64)
    logits = logits[:-1]
    top = logits.max(-1, keepdims=True)
    logz = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]
    total += float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum())
    count += len(window) - 1
print(json.dumps({"nll": total, "tokens": count}))
"""


def llamacpp_python() -> Path:
    return side_venv(cache_dir("venvs", "llamacpp"), [REQUIREMENT], {**os.environ, "CMAKE_ARGS": "-DLLAVA_BUILD=OFF"})


def llamacpp_tools() -> Path:
    """The folder holding llama-quantize and llama-imatrix, built once from the sdist's vendored llama.cpp."""
    tools = cache_dir("llamacpp-tools")
    if (tools / "llama-quantize").exists() and (tools / "llama-imatrix").exists():
        return tools
    print(f"building llama-quantize and llama-imatrix into {tools} (once, ~10 CPU-minutes)", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="llamacpp-src-"))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", REQUIREMENT,
                    "-d", str(work)], check=True)
    (sdist,) = work.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    (source,) = work.glob("*/vendor/llama.cpp")
    build = source / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "llama-quantize",
                    "llama-imatrix"], check=True)
    for name in ("llama-quantize", "llama-imatrix"):
        (tools / name).write_bytes((build / "bin" / name).read_bytes())
        (tools / name).chmod(0o755)
    for library in (build / "bin").glob("*.so*"):  # the tools' shared libraries, found beside them (rpath $ORIGIN)
        (tools / library.name).write_bytes(library.read_bytes())
    return tools


def run_tool(tools: Path, name: str, *args: str) -> None:
    env = {**os.environ, "LD_LIBRARY_PATH": f"{tools}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    done = subprocess.run([str(tools / name), *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def llamacpp_perplexity(python: Path, gguf_file: Path, windows: dict[str, Path], threads: int) -> dict[str, float]:
    out = {}
    for corpus, path in windows.items():
        done = subprocess.run([str(python), "-c", NLL_WORKER, str(gguf_file), str(path), str(threads)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"llama.cpp failed on {gguf_file}:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.splitlines()[-1])
        out[f"ppl_{corpus}"] = math.exp(result["nll"] / result["tokens"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m"])
    parser.add_argument("--types", default="Q4_0,Q4_1")
    parser.add_argument("--methods", default="turboboa", help="boa methods, each quantized on every type's grids")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    python, tools = llamacpp_python(), llamacpp_tools()
    work = Path(tempfile.mkdtemp(prefix="gguf-quality-"))
    vocab = BUILTIN_MODELS[args.model].gguf_path()
    fp_model, tokenizer, adapter = boa.load_model(args.model)
    calib = boa.data.calibration_windows(tokenizer, "wikipedia", nsamples=args.nsamples, seqlen=args.seqlen)
    windows = {}
    for corpus in EVAL_CORPORA:
        w = eval_windows(fp_model.config, eval_tokens(tokenizer, corpus), 512, args.eval_windows)
        windows[corpus] = work / f"{corpus}.npy"
        np.save(windows[corpus], w.numpy().astype(np.int32))
    calib_text = work / "calib.txt"
    calib_text.write_text(corpus_text("wikipedia", "calib"), encoding="utf-8")

    rows = []
    header = {**machine(), "model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "eval_windows": args.eval_windows, "threads": args.threads, "llama_cpp": REQUIREMENT}

    def record(row):
        rows.append(row)
        write_json(args.json, {**header, "results": rows})
        print(json.dumps(row), flush=True)

    fp_file = export_gguf(fp_model, {}, work / "fp.gguf", "F32", vocab_from=vocab)
    record({"engine": "boa", "model": "fp", **evaluate_perplexity(fp_model, tokenizer, max_windows=args.eval_windows)})
    record({"engine": "llama.cpp", "model": "fp (F32 GGUF)", **llamacpp_perplexity(python, fp_file, windows,
                                                                                    args.threads)})
    imatrix = work / "imatrix.gguf"
    run_tool(tools, "llama-imatrix", "-m", str(fp_file), "-f", str(calib_text), "-o", str(imatrix), "-c",
             str(args.seqlen), "--chunks", str(args.nsamples), "-t", str(args.threads))
    for kind in args.types.split(","):
        for importance in (False, True):
            out = work / f"llamacpp-{kind}{'-imatrix' if importance else ''}.gguf"
            run_tool(tools, "llama-quantize", *(["--imatrix", str(imatrix)] if importance else []),
                     "--token-embedding-type", "f16", "--output-tensor-type", "f16", str(fp_file), str(out), kind,
                     str(args.threads))
            record({"engine": "llama.cpp", "model": f"llama.cpp {kind}" + (" + imatrix" if importance else ""),
                    "type": kind, **llamacpp_perplexity(python, out, windows, args.threads)})
        for method in args.methods.split(","):
            model = copy.deepcopy(fp_model)
            config = boa.algorithms.method_from_dict({"method": method, "gguf": kind})
            start = time.perf_counter()
            result = boa.quantize(model, config, calib, adapter=adapter, progress=True)
            seconds = time.perf_counter() - start
            ours = evaluate_perplexity(model, tokenizer, max_windows=args.eval_windows)
            record({"engine": "boa", "model": f"boa {method} {kind}", "type": kind, "seconds": seconds, **ours})
            out = export_gguf(model, result.layers, work / f"boa-{method}-{kind}.gguf", kind, config=result.config,
                              vocab_from=vocab)
            record({"engine": "llama.cpp", "model": f"boa {method} {kind} (GGUF)", "type": kind,
                    **llamacpp_perplexity(python, out, windows, args.threads)})
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
