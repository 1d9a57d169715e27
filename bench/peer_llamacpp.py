"""Decode and prefill speed of llama.cpp beside boa's own decode loop (boa.decode), same machine, same threads, one run.

    python bench/peer_llamacpp.py --json bench/results/decode_llamacpp.json [--threads 2] [--tokens 64]
        [--prefill 512] [--models smollm2,llama] [--dtypes float32,bfloat16]

Models: the packaged SmolLM2-135M, and a Llama-shaped model with random weights (bench/gemv.py's LLAMA: 2048 wide,
MLP 5632, 16 query / 4 KV heads, 6 blocks) with SmolLM2's 49152-token vocabulary so that one tokenizer serves both.
llama.cpp (PyPI `llama-cpp-python`, built from its sdist: ~12 CPU-minutes, in its own venv $BOA_CACHE/venvs/llamacpp,
`--venv` reuses another; a subprocess) runs
    llama.cpp-Q4_0/Q4_1/Q8_0   its own quantization of the model's F16 GGUF (written by boa's export); the Llama
                               (rows of 2048 and 5632 = 22 · 256) also Q2_K/Q3_K/Q4_K (SmolLM2's 576 do not split
                               into the K types' 256)
    boa-gguf-TYPE              boa's export of the model quantized on that type's grids (RTN: speed does not depend
                               on the method), the embedding and head as Q8_0 (`float_type="q8_0"`; llama.cpp's own
                               quantization keeps a head at 6–8 bits too), to check that boa's files run as fast
                               as llama.cpp's own; `weights_exact`: every quantized tensor of the file, read back by
                               the `gguf` package, is boa's dequantized weight bit for bit
boa runs the float model through transformers' forward (transformers-*) and through boa's decode loop (boa-fp-*),
and RTN W4/W3/W2 with grids per 32 weights (asymmetric), packed, through boa's decode loop (boa-wN-*), the rest of
the model in each of --dtypes; boa-w4-*-head8 runs the output head packed at 8 bits (`head_bits=8`, as llama.cpp's
files hold it at Q8_0: its logits are no longer exactly the model's).
Each row: decode tok/s (a short prompt, --tokens greedy tokens, counted after the first, best of 3) and prefill tok/s
(--prefill tokens of Austen text in one call on an empty cache, best of 3); `vs_llamacpp_q4_0` divides both by
llama.cpp's own Q4_0 on the same model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import boa
from boa import decode
from boa.core.io import cache_dir, write_json
from boa.data import corpus_text
from boa.core.gguf_grids import SUPER_BLOCK
from boa.export import export_gguf
from boa.export.gguf_format import gguf_name, interleaved_rows
from boa.generate import generate
from boa.models.loader import BUILTIN_MODELS
from boa.nn import pack_model

from _common import machine, side_venv
from gemv import LLAMA, short

PROMPT = "The history of the city of London begins"
REQUIREMENT = "llama-cpp-python==0.3.36"
GGUF_TYPES = ("Q4_0", "Q4_1", "Q8_0")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K")  # where every row splits into 256
GROUP = 32
BITS = (4, 3, 2)
RUNS = 3

# Runs inside the llama.cpp venv: argv[1] = a JSON job {threads, tokens, prompt, prefill_ids, quantize: [[source,
# out, type]], models: [[name, path]]}; prints one JSON line per model.
WORKER = r"""
import json, sys, time, os
import llama_cpp
import llama_cpp.llama_cpp as low
from llama_cpp import Llama

_defaults = low.llama_model_default_params
def _params():  # ggml's AMX buffer type crashes on Intel AMX machines: keep it out
    params = _defaults()
    params.use_extra_bufts = False
    return params
low.llama_model_default_params = _params

job = json.loads(open(sys.argv[1]).read())
for source, out, kind in job["quantize"]:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + kind)
    assert llama_cpp.llama_model_quantize(source.encode(), out.encode(), params) == 0, kind
threads, tokens, prefill = job["threads"], job["tokens"], job["prefill_ids"]
for name, path in job["models"]:
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=len(prefill) + tokens + 16,
                n_batch=len(prefill), n_ubatch=len(prefill), verbose=False)
    decode_best, prefill_best = 0.0, 0.0
    for _ in range(3):
        llm.reset()
        llm.eval(llm.tokenize(job["prompt"].encode()))
        token = llm.sample(temp=0.0)
        start = time.perf_counter()
        for _ in range(tokens - 1):
            llm.eval([token])
            token = llm.sample(temp=0.0)
        decode_best = max(decode_best, (tokens - 1) / (time.perf_counter() - start))
        llm.reset()
        start = time.perf_counter()
        llm.eval(prefill)
        prefill_best = max(prefill_best, len(prefill) / (time.perf_counter() - start))
    print(json.dumps({"engine": name, "decode_tok_s": decode_best, "prefill_tok_s": prefill_best,
                      "model_bytes": os.path.getsize(path)}), flush=True)
    del llm
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--models", default="smollm2,llama")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--venv", type=Path, help="a venv with llama-cpp-python (default: made in $BOA_CACHE/venvs)")
    return p.parse_args()


def llamacpp_python(folder: Path | None) -> Path:
    if folder is not None:
        return folder / "bin" / "python"
    return side_venv(cache_dir("venvs", "llamacpp"), [REQUIREMENT], {**os.environ, "CMAKE_ARGS": "-DLLAVA_BUILD=OFF"})


def load(name: str):
    model, tokenizer, _ = boa.load_model("smollm2-135m")
    if name == "smollm2":
        return model, tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**LLAMA, "vocab_size": model.config.vocab_size, "bos_token_id": 1, "eos_token_id": 2})
    return LlamaForCausalLM(config).eval(), tokenizer


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def best_of(run) -> float:
    return max(run() for _ in range(RUNS))


@torch.inference_mode()
def prefill_tok_s(model, ids: torch.Tensor, engine: str, head_bits: int | None) -> float:
    def once() -> float:
        if engine == "boa":
            decoder = decode.Decoder(model, ids.shape[1] + 1, head_bits=head_bits)
            start = time.perf_counter()
            decoder.step(ids)
        else:
            start = time.perf_counter()
            model(ids, use_cache=True)
        return ids.shape[1] / (time.perf_counter() - start)
    return best_of(once)


def boa_row(model, tokenizer, ids, engine: str, label: str, tokens: int, head_bits: int | None = None) -> dict:
    decode_speed = best_of(lambda: generate(model, tokenizer, PROMPT, tokens, stop_at_eos=False, engine=engine,
                                            head_bits=head_bits).tok_s)
    row = {"engine": label, "decode_tok_s": decode_speed, "prefill_tok_s": prefill_tok_s(model, ids, engine, head_bits),
           "model_bytes": model_bytes(model)}
    print(f"  {label}: {row['decode_tok_s']:.1f} decode tok/s, {row['prefill_tok_s']:.1f} prefill tok/s", flush=True)
    return row


def boa_rows(name: str, ids: torch.Tensor, dtypes: list[torch.dtype], tokens: int) -> list[dict]:
    rows = []
    model, tokenizer = load(name)
    for dtype in dtypes:
        model = model.to(dtype)
        rows.append(boa_row(model, tokenizer, ids, "transformers", f"transformers-{short(dtype)}", tokens))
        rows.append(boa_row(model, tokenizer, ids, "boa", f"boa-fp-{short(dtype)}", tokens))
    for bits in BITS:
        model, tokenizer = load(name)
        result = boa.quantize(model, boa.RTN(bits=bits, group_size=GROUP), None, progress=False)
        packed = pack_model(result.model, result.layers)
        for dtype in dtypes:
            packed = packed.to(dtype)
            rows.append(boa_row(packed, tokenizer, ids, "boa", f"boa-w{bits}-{short(dtype)}", tokens))
            if bits == 4:
                rows.append(boa_row(packed, tokenizer, ids, "boa", f"boa-w4-{short(dtype)}-head8", tokens,
                                    head_bits=8))
    return rows


def gguf_files(name: str, work: Path) -> tuple[list[list[str]], list[list[str]]]:
    """llama.cpp's quantization jobs [source, out, type] and the models to time [label, path]: the F16 export for
    llama.cpp to quantize, and boa's own export of every type."""
    vocab = BUILTIN_MODELS["smollm2-135m"].gguf_path()
    model, _ = load(name)
    source = export_gguf(model, {}, work / f"{name}-f16.gguf", "F16", vocab_from=vocab)
    widths = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    kinds = GGUF_TYPES + (K_TYPES if all(w % SUPER_BLOCK == 0 for w in widths) else ())
    quantize, models, exact = [], [], {}
    for kind in kinds:
        out = work / f"{name}-llamacpp-{kind}.gguf"
        quantize.append([str(source), str(out), kind + ("_S" if kind in ("Q3_K", "Q4_K") else "")])
        models.append([f"llama.cpp-{kind}", str(out)])
    for kind in kinds:
        model, _ = load(name)
        result = boa.quantize(model, boa.RTN(gguf=kind), None, progress=False)
        out = export_gguf(result.model, result.layers, work / f"{name}-boa-{kind}.gguf", kind, config=result.config,
                          vocab_from=vocab, float_type="q8_0")
        models.append([f"boa-gguf-{kind}", str(out)])
        exact[f"boa-gguf-{kind}"] = weights_exact(out, result.layers)
    return quantize, models, exact


def weights_exact(path: Path, layers: dict) -> bool:
    """Whether every quantized tensor of the GGUF file, dequantized by the `gguf` package, is boa's weight (q and k
    in llama.cpp's interleaved row order)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    heads = {role: reader.fields[f"llama.attention.{key}"].contents()
             for role, key in (("q_proj", "head_count"), ("k_proj", "head_count_kv"))}
    for module, q in layers.items():
        t = tensors[gguf_name(module)]
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        expected = q.dequantize().float()
        role = module.rsplit(".", 1)[-1]
        if role in heads:
            expected = expected[interleaved_rows(expected.shape[0], heads[role])]
        if not torch.equal(got.reshape(expected.shape), expected):
            return False
    return True


def llamacpp_rows(python: Path, name: str, ids: torch.Tensor, threads: int, tokens: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="peer-llamacpp-") as folder:
        work = Path(folder)
        quantize, models, exact = gguf_files(name, work)
        job = work / "job.json"
        job.write_text(json.dumps({"threads": threads, "tokens": tokens, "prompt": PROMPT, "quantize": quantize,
                                   "models": models, "prefill_ids": ids[0].tolist()}))
        done = subprocess.run([str(python), "-c", WORKER, str(job)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"llama.cpp failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        if row["engine"] in exact:
            row["weights_exact"] = exact[row["engine"]]
        print(f"  {row['engine']}: {row['decode_tok_s']:.1f} decode tok/s, {row['prefill_tok_s']:.1f} prefill tok/s",
              flush=True)
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    python = llamacpp_python(args.venv)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    _, tokenizer = load("smollm2")
    text = corpus_text("austen", "eval")[:20 * args.prefill]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :args.prefill]
    rows = []
    for name in args.models.split(","):
        print(f"{name}:", flush=True)
        ours = llamacpp_rows(python, name, ids, args.threads, args.tokens) + boa_rows(name, ids, dtypes, args.tokens)
        reference = next(r for r in ours if r["engine"] == "llama.cpp-Q4_0")
        for row in ours:
            row.update(model=name, threads=args.threads, vs_llamacpp_q4_0={
                "decode": row["decode_tok_s"] / reference["decode_tok_s"],
                "prefill": row["prefill_tok_s"] / reference["prefill_tok_s"]})
        rows += ours
    print(f"{'model':<8} {'engine':<22} {'decode tok/s':>12} {'× Q4_0':>7} {'prefill tok/s':>14} {'× Q4_0':>7} "
          f"{'MiB':>8}")
    for r in rows:
        print(f"{r['model']:<8} {r['engine']:<22} {r['decode_tok_s']:12.1f} {r['vs_llamacpp_q4_0']['decode']:7.2f} "
              f"{r['prefill_tok_s']:14.1f} {r['vs_llamacpp_q4_0']['prefill']:7.2f} {r['model_bytes'] / 2**20:8.1f}")
    write_json(args.json, {**machine(), "torch": torch.__version__, "llama_cpp": REQUIREMENT, "tokens": args.tokens,
                           "prefill": args.prefill, "prompt": PROMPT, "group_size": GROUP, "rows": rows})


if __name__ == "__main__":
    main()
