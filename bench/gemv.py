"""boa's packed low-bit matmul against dense torch and torch's own int4 CPU kernel, side by side, and the decode speed
of whole models with their linear layers packed.

    python bench/gemv.py --json bench/results/gemv.json [--plot FILE] [--threads 2] [--shapes 4096x4096,...]
                         [--no-int8] [--no-decode] [--quick]

results: y = x · Wᵀ for W (out × in) of real layers' shapes (SmolLM2-135M's MLP, Llama-3-8B's attention and MLP),
random codes at 2/3/4 bits with grids per group of 128 input columns (576-wide inputs end in a partial group),
packed by boa.core.packed.pack; batch 1 (op "gemv": the kernel's GEMV path, one decode step) and batch 16 (op
"gemm": dequantize blocks + BLAS). Ours is the C++ CPU kernel called directly (load_cpu().packed_matmul), with x in
float32 (split in two bf16 parts, ~fp32 accuracy) and in bfloat16 (one exact bf16 product): x_dtype. All of one
shape is timed together, against:
    torch-fp32 / torch-bf16  torch.matmul(x, W.t()) with x and W both float32 / both bfloat16 (speedup_fp32 / _bf16)
    torch-int4               aten._weight_int4pack_mm_for_cpu on the same 4-bit codes and grids (weight packed by
                             aten._convert_weight_to_int4pack_for_cpu, group 128, scales and zeros in x's dtype;
                             it takes float32, float16 and bfloat16 x, timed with the row's x dtype):
                             speedup_torch_int4 = its seconds / ours, 4-bit rows only. It needs in % 128 == 0, so
                             it is null for the 576-wide inputs.
Every timing: two warm-up calls, then the best (min) of REPEATS loops of calls (each loop about TARGET_S long), with
torch.set_num_threads(--threads). Weights are cold, as in a decode step through a model larger than the caches: each
call reads the next of enough copies of the weight to fill COLD_BYTES (4× the 32 MiB L3 here). Before timing, every
kernel's output is checked against packed_matmul_torch (dequantize, then a float32 matmul): relative error (Frobenius)
below 1e-4 for float32 x, 1e-2 for bfloat16 x (bf16 grids and output rounding), or the run stops.
    bytes: what the kernel must read: packed weight + scales + zeros + x (dense: W + x); gbps = bytes / seconds;
    bw_fraction = gbps / copy_gbps, copy_gbps being this machine's memory bandwidth measured as dst.copy_(src) on
    COPY_MIB float32 buffers, bytes read + written, best of REPEATS.

int8 (JSON "int8"): low-bit activations, W8A8 and W4A8 through the C++ integer kernel called directly
(load_cpu().int8_matmul: x quantized per token to 8 bits inside the call, clip 0.9, then vpdpbusd-style integer
dot products per group of 128), on INT8_SHAPE at batch 1 (op "gemv", a decode step) and INT8_PREFILL (op "gemm", a
prefill), x in bfloat16, weights cold, against torch.matmul in bfloat16 (speedup_bf16) and boa's W4 weight-only
kernel on the same x (speedup_boa_w4 = its seconds / ours; kernels "torch-bf16" and "boa-w4" are the baseline rows).
Each is checked first on its first CHECK_TOKENS tokens: against int8_matmul_torch (integer sums per group), or
packed_matmul_torch for boa-w4, with the bfloat16 tolerance below.
hadamard (JSON "hadamard"): the online rotation of down_proj's input (boa_kernels.hadamard_transform's C++ kernel on
rows of HADAMARD_SHAPE's width 14336 = 28 · 512: Llama-3-8B's MLP, Rotation.build's core and signs, bfloat16) at
both batches, against that down_proj itself (W4A8, int8 kernel, weights cold): hadamard_fraction = rotation seconds
/ down_proj seconds. Checked first against hadamard_transform_torch (fp32 reference) with the bfloat16 tolerance.

GPU (where torch sees one; not yet run on one): the same shapes, widths and batches through boa_kernels.packed_matmul
(CUDA GEMV at batch ≤ 8, Triton GEMM above) with float16 x, against torch.matmul in float16 and float32
(speedup_fp16, speedup_fp32), weights cold (COLD_BYTES cycle), timings synchronized; rows with "device": "cuda" and
bw_fraction against the GPU's own copy bandwidth (machine.gpu_copy_gbps).

decode: tokens/s of greedy decoding (boa.generate.generate, DECODE_TOKENS new tokens after a short prompt, the first
new token — the prefill's — not counted), best of DECODE_RUNS, for SmolLM2-135M (transformers as it is, in float32 and
in bfloat16, and RTN-quantized at 4/3/2 bits with groups of 64, packed by boa.nn.pack_model, the rest of the model in
float32 or bfloat16) and for a Llama-shaped model with random weights (LLAMA below; float32, and packed W4/W3/W2 with
the rest in float32). The embeddings and lm_head stay dense. model_bytes: parameters + buffers, as held in memory.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import boa
import boa.nn
from boa.core.packed import PackedWeight, pack
from boa.generate import generate
from boa.core.io import write_json
from boa.core.quantizer import QuantizedWeight
from boa.transforms.hadamard import Rotation
from boa_kernels.loader import load_cpu
from boa_kernels.dispatch import backend_for
from boa_kernels.hadamard import hadamard_transform_torch
from boa_kernels.int8_matmul import int8_matmul_torch
from boa_kernels.packed_matmul import GEMV_MAX_BATCH, packed_matmul, packed_matmul_torch

from _common import machine as host_machine  # bench/ is sys.path[0] when run as a script

SEED = 0
SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 14336), (14336, 4096)]  # [out, in]
BITS = (4, 3, 2)
GROUP = 128
BATCHES = (1, 16)
X_DTYPES = (torch.float32, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
REPEATS = 5
TARGET_S = 0.1
COLD_BYTES = 128 << 20
COPY_MIB = 256
INT4_GROUP = 128

INT8_SHAPE = (4096, 4096)  # [out, in]
INT8_PREFILL = 512
INT8_BITS = (8, 4)  # weight bits of W8A8, W4A8
A_BITS = 8
A_CLIP = 0.9  # boa.transforms.ActivationQuant's default
CHECK_TOKENS = 4  # the int8 reference sums in int64, too slow for a whole prefill
HADAMARD_SHAPE = (4096, 14336)  # Llama-3-8B's down_proj [out, in]: its input is rotated online

PROMPT = "The capital of France is"
DECODE_TOKENS = 64
DECODE_RUNS = 3
DECODE_GROUP = 64
LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
             num_hidden_layers=6, vocab_size=32000, max_position_embeddings=2048)


@dataclass(frozen=True)
class Settings:
    repeats: int
    target_s: float
    decode_tokens: int
    decode_runs: int
    llama_layers: int


FULL = Settings(REPEATS, TARGET_S, DECODE_TOKENS, DECODE_RUNS, LLAMA["num_hidden_layers"])
QUICK = Settings(3, 0.02, 8, 1, 1)


# ----------------------------------------------------------------------------------------------------- timing


def best_seconds(fn, settings: Settings, target_s: float | None = None, sync=None) -> float:
    """Seconds per call: two warm-up calls, then the best of `repeats` loops of calls about target_s long (default:
    the settings'). `sync` (torch.cuda.synchronize on a GPU) runs before every reading of the clock."""
    def clock() -> float:
        if sync is not None:
            sync()
        return time.perf_counter()

    fn()
    start = clock()
    fn()
    target = settings.target_s if target_s is None else target_s
    calls = max(1, min(1000, round(target / (clock() - start))))
    best = math.inf
    for _ in range(settings.repeats):
        start = clock()
        for _ in range(calls):
            fn()
        best = min(best, (clock() - start) / calls)
    return best


def cold(call, tensors: tuple[torch.Tensor, ...], nbytes: int):
    """A function calling `call(*tensors)` on the next of enough copies of `tensors` to fill COLD_BYTES, so that
    every call reads its weight from memory, not from a cache."""
    count = max(1, math.ceil(COLD_BYTES / nbytes))
    copies = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(count - 1)]
    cycle = itertools.cycle(copies)
    return lambda: call(*next(cycle))


def copy_gbps(settings: Settings, device: torch.device = torch.device("cpu")) -> float:
    src = torch.rand(COPY_MIB << 18, device=device)  # COPY_MIB MiB of float32
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), settings, target_s=0, sync=synchronizer(device))  # one per repeat
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def synchronizer(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------------ weights


def random_weight(out: int, n: int, bits: int, generator: torch.Generator) -> QuantizedWeight:
    groups = -(-n // GROUP)
    codes = torch.randint(0, 1 << bits, (out, n), dtype=torch.uint8, generator=generator)
    scale = 0.005 + 0.01 * torch.rand(out, groups, generator=generator)
    zero = torch.randint(0, 1 << bits, (out, groups), generator=generator).float()
    return QuantizedWeight(codes, scale, zero, torch.arange(n, dtype=torch.int32) // GROUP, bits)


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def int4_weight(q: QuantizedWeight) -> torch.Tensor | None:
    """torch's int4 CPU layout of a 4-bit weight, or None where its kernel cannot take the shape."""
    out, n = q.codes.shape
    if n % INT4_GROUP or out % 16:
        return None
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.codes.to(torch.int32), 1)


def int4_grids(q: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """(groups, out, 2): torch dequantizes (code − 8) · scale + zero, so zero = scale · (8 − boa's integer zero)."""
    return torch.stack([q.scale.t(), (q.scale * (8 - q.zero)).t()], dim=-1).to(dtype).contiguous()


def check(name: str, y: torch.Tensor, reference: torch.Tensor, x_dtype: torch.dtype,
          against: str = "packed_matmul_torch") -> float:
    err = float((y.float() - reference).norm() / reference.norm())
    if not err < TOLERANCE[x_dtype]:
        raise SystemExit(f"{name}: relative error {err:.2e} against {against} exceeds "
                         f"{TOLERANCE[x_dtype]:.0e}; not timing a wrong kernel")
    return err


# --------------------------------------------------------------------------------------------------- matmul


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def result_row(device: str, shape: tuple[int, int], batch: int, x_dtype: torch.dtype, seconds: float, read: int,
               bandwidth: float, **extra) -> dict:
    """One JSON row: `read` bytes in `seconds`, against the device's copy `bandwidth`."""
    gbps = read / seconds / 1e9
    return {"device": device, "op": "gemv" if batch <= GEMV_MAX_BATCH else "gemm", "shape": list(shape),
            "batch": batch, "x_dtype": dtype_name(x_dtype), **extra, "seconds": seconds, "bytes": read,
            "gbps": gbps, "bw_fraction": gbps / bandwidth}


def bench_shape(shape: tuple[int, int], settings: Settings, bandwidth: float) -> tuple[list[dict], list[dict]]:
    """(rows of ours, rows of the torch baselines) for one [out, in] at every width, batch and x dtype."""
    out, n = shape
    generator = torch.Generator().manual_seed(SEED)
    weights = {bits: random_weight(out, n, bits, generator) for bits in BITS}
    packed = {bits: pack(q) for bits, q in weights.items()}
    dense = torch.randn(out, n, generator=generator)
    int4 = int4_weight(weights[4])
    rows, baselines = [], []

    def row(batch: int, x_dtype: torch.dtype, seconds: float, read: int, **extra) -> dict:
        return result_row("cpu", shape, batch, x_dtype, seconds, read, bandwidth, **extra)

    for batch in BATCHES:
        x32 = torch.randn(batch, n, generator=generator)
        base = {}
        for dtype in X_DTYPES:
            x, w = x32.to(dtype), dense.to(dtype)
            base[dtype] = best_seconds(cold(dense_matmul, (x, w), nbytes(w)), settings)
            baselines.append(row(batch, dtype, base[dtype], nbytes(x, w), kernel=f"torch-{short(dtype)}"))
        int4_seconds = {}
        for dtype in X_DTYPES if int4 is not None else ():
            x, grids = x32.to(dtype), int4_grids(weights[4], dtype)
            error = check(f"torch int4 {shape} batch {batch} x {dtype}", int4_matmul(x, int4, grids),
                          packed_matmul_torch(x.float(), packed[4]), dtype)
            int4_seconds[dtype] = best_seconds(cold(int4_matmul, (x, int4, grids), nbytes(int4, grids)), settings)
            baselines.append(row(batch, dtype, int4_seconds[dtype], nbytes(x, int4, grids), kernel="torch-int4",
                                 rel_err=error))
        for bits, p in packed.items():
            call = packed_call(p)
            tensors = (p.qweight, p.scales, p.zeros)
            for dtype in X_DTYPES:
                x = x32.to(dtype)
                error = check(f"packed w{bits} {shape} batch {batch} x {dtype}", call(x, *tensors),
                              packed_matmul_torch(x.float(), p), dtype)
                seconds = best_seconds(cold(call, (x, *tensors), p.nbytes()), settings)
                int4_ratio = int4_seconds[dtype] / seconds if bits == 4 and dtype in int4_seconds else None
                rows.append(row(batch, dtype, seconds, p.nbytes() + nbytes(x), bits=bits, rel_err=error,
                                speedup_fp32=base[torch.float32] / seconds,
                                speedup_bf16=base[torch.bfloat16] / seconds, speedup_torch_int4=int4_ratio))
    return rows, baselines


def bench_shape_gpu(shape: tuple[int, int], settings: Settings, bandwidth: float, device: torch.device) -> list[dict]:
    """Rows for one [out, in] on a GPU: boa_kernels.packed_matmul (the CUDA GEMV at batch ≤ 8, the Triton GEMM above)
    with float16 x, against torch.matmul in float16 (speedup_fp16, the GPU targets' yardstick) and float32."""
    out, n = shape
    generator = torch.Generator().manual_seed(SEED)
    dense = torch.randn(out, n, generator=generator)
    sync = synchronizer(device)
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, n, generator=generator).to(device, torch.float16)
        base = {}
        for dtype in (torch.float32, torch.float16):
            w = dense.to(device, dtype)
            base[dtype] = best_seconds(cold(dense_matmul, (x.to(dtype), w), nbytes(w)), settings, sync=sync)
        for bits in BITS:
            p = pack(random_weight(out, n, bits, generator))
            p = PackedWeight(p.qweight.to(device), p.scales.to(device), p.zeros.to(device), None, bits, n,
                             p.group_size)

            def call(x, qweight, scales, zeros, p=p):
                return packed_matmul(x, PackedWeight(qweight, scales, zeros, None, p.bits, n, p.group_size))

            error = check(f"packed w{bits} {shape} batch {batch} on {device}", call(x, p.qweight, p.scales, p.zeros),
                          packed_matmul_torch(x.float(), p), torch.float16)
            seconds = best_seconds(cold(call, (x, p.qweight, p.scales, p.zeros), p.nbytes()), settings, sync=sync)
            kernel = backend_for(device, ("cuda", "triton") if batch <= GEMV_MAX_BATCH else ("triton",))
            rows.append(result_row(device.type, shape, batch, torch.float16, seconds, p.nbytes() + nbytes(x),
                                   bandwidth, bits=bits, kernel=kernel, rel_err=error,
                                   speedup_fp32=base[torch.float32] / seconds,
                                   speedup_fp16=base[torch.float16] / seconds, speedup_bf16=None,
                                   speedup_torch_int4=None))
    return rows


def dense_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x, w.t())


def int4_matmul(x: torch.Tensor, w: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, INT4_GROUP, grids)


def packed_call(p: PackedWeight):
    """f(x, qweight, scales, zeros): the C++ kernel on p's layout, with the least Python in between."""
    kernel = load_cpu().packed_matmul
    return lambda x, qweight, scales, zeros: kernel(x, qweight, scales, zeros, p.perm, None, p.bits, p.group_size)


# ----------------------------------------------------------------------------------------------------- int8


def int8_call(p: PackedWeight):
    """f(x, qweight, scales, zeros): the C++ integer kernel on p's layout, x quantized per token to A_BITS."""
    kernel = load_cpu().int8_matmul
    return lambda x, qweight, scales, zeros: kernel(x, qweight, scales, zeros, p.perm, None, p.bits, p.group_size,
                                                    A_BITS, A_CLIP)


def check_int8(name: str, call, x: torch.Tensor, p: PackedWeight) -> float:
    """The kernel against int8_matmul_torch on x's first CHECK_TOKENS tokens (each token is quantized alone)."""
    head = x[:CHECK_TOKENS]
    return check(name, call(head, p.qweight, p.scales, p.zeros),
                 int8_matmul_torch(head.float(), p, a_bits=A_BITS, clip_ratio=A_CLIP), x.dtype, "int8_matmul_torch")


def bench_int8(settings: Settings, bandwidth: float) -> list[dict]:
    """W8A8 and W4A8 rows on INT8_SHAPE at batch 1 and INT8_PREFILL, with their baselines torch-bf16 and boa-w4."""
    out, n = INT8_SHAPE
    generator = torch.Generator().manual_seed(SEED)
    packed = {bits: pack(random_weight(out, n, bits, generator)) for bits in INT8_BITS}
    dense = torch.randn(out, n, generator=generator).to(torch.bfloat16)
    rows = []

    def row(batch: int, x: torch.Tensor, seconds: float, read: int, **extra) -> dict:
        return result_row("cpu", INT8_SHAPE, batch, x.dtype, seconds, read, bandwidth, **extra)

    for batch in (1, INT8_PREFILL):
        x = torch.randn(batch, n, generator=generator).to(torch.bfloat16)
        bf16 = best_seconds(cold(dense_matmul, (x, dense), nbytes(dense)), settings)
        rows.append(row(batch, x, bf16, nbytes(x, dense), kernel="torch-bf16"))
        w4, w4_call = packed[4], packed_call(packed[4])
        tensors = (w4.qweight, w4.scales, w4.zeros)
        error = check(f"packed w4 {INT8_SHAPE} batch {batch}", w4_call(x[:CHECK_TOKENS], *tensors),
                      packed_matmul_torch(x[:CHECK_TOKENS].float(), w4), x.dtype)
        w4_seconds = best_seconds(cold(w4_call, (x, *tensors), w4.nbytes()), settings)
        rows.append(row(batch, x, w4_seconds, w4.nbytes() + nbytes(x), kernel="boa-w4", bits=4, rel_err=error))
        for bits, p in packed.items():
            call = int8_call(p)
            error = check_int8(f"int8 w{bits}a{A_BITS} {INT8_SHAPE} batch {batch}", call, x, p)
            seconds = best_seconds(cold(call, (x, p.qweight, p.scales, p.zeros), p.nbytes()), settings)
            rows.append(row(batch, x, seconds, p.nbytes() + nbytes(x), kernel=f"boa-w{bits}a{A_BITS}", bits=bits,
                            a_bits=A_BITS, rel_err=error, speedup_bf16=bf16 / seconds,
                            speedup_boa_w4=w4_seconds / seconds))
    return rows


def bench_hadamard(settings: Settings) -> list[dict]:
    """The online rotation of down_proj's input against down_proj itself (W4A8), at batch 1 and INT8_PREFILL."""
    out, n = HADAMARD_SHAPE
    generator = torch.Generator().manual_seed(SEED)
    rotation = Rotation.build(n, seed=SEED)
    core, signs, scale = rotation.core.float(), rotation.signs.float(), 1 / n**0.5
    p = pack(random_weight(out, n, 4, generator))
    down_proj = int8_call(p)
    kernel = load_cpu().hadamard_transform
    rows = []
    for batch in (1, INT8_PREFILL):
        x = torch.randn(batch, n, generator=generator).to(torch.bfloat16)
        error = check(f"hadamard {n} batch {batch}", kernel(x, signs, core, scale),
                      hadamard_transform_torch(x.float(), core, signs, scale), x.dtype, "hadamard_transform_torch")
        check_int8(f"int8 down_proj {HADAMARD_SHAPE} batch {batch}", down_proj, x, p)
        seconds = best_seconds(lambda: kernel(x, signs, core, scale), settings)
        down_seconds = best_seconds(cold(down_proj, (x, p.qweight, p.scales, p.zeros), p.nbytes()), settings)
        rows.append({"device": "cpu", "op": "hadamard", "width": n, "core": core.shape[0], "batch": batch,
                     "x_dtype": dtype_name(x.dtype), "seconds": seconds, "rel_err": error,
                     "down_proj_shape": list(HADAMARD_SHAPE), "down_proj_kernel": f"boa-w4a{A_BITS}",
                     "down_proj_seconds": down_seconds, "hadamard_fraction": seconds / down_seconds})
    return rows


# --------------------------------------------------------------------------------------------------- decode


def model_bytes(model: torch.nn.Module) -> int:
    return nbytes(*model.parameters(), *model.buffers())


def decode_row(model, tokenizer, name: str, engine: str, settings: Settings) -> dict:
    runs = [generate(model, tokenizer, PROMPT, max_new_tokens=settings.decode_tokens, stop_at_eos=False)
            for _ in range(settings.decode_runs)]
    best = max(runs, key=lambda r: r.tok_s)
    row = {"device": "cpu", "model": name, "engine": engine, "tok_s": best.tok_s, "model_bytes": model_bytes(model),
           "new_tokens": len(best.tokens), "prefill_seconds": best.prefill_seconds, "text": best.text}
    print(f"  {name:<14} {engine:<18} {row['tok_s']:8.1f} tok/s  {row['model_bytes'] / 2**20:8.1f} MiB  "
          f"{best.text[:48]!r}", flush=True)
    return row


def smollm2():
    model, tokenizer, _ = boa.load_model("smollm2-135m")
    return model, tokenizer


def random_llama(layers: int):
    """A Llama-shaped model with random weights (LLAMA, `layers` blocks), with SmolLM2's tokenizer for the prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, "num_hidden_layers": layers})).eval()
    _, tokenizer = smollm2()
    return model, tokenizer


def bench_decode(name: str, load, dtypes: tuple[torch.dtype, ...], settings: Settings) -> list[dict]:
    """transformers as it is, then RTN W4/W3/W2 packed, each with the rest of the model in every dtype of `dtypes`."""
    rows = []
    model, tokenizer = load()
    for dtype in dtypes:
        rows.append(decode_row(model.to(dtype), tokenizer, name, f"transformers-{short(dtype)}", settings))
    for bits in BITS:
        model, tokenizer = load()
        result = boa.quantize(model, boa.RTN(bits=bits, group_size=DECODE_GROUP), calib=None, progress=False)
        packed = boa.nn.pack_model(result.model, result.layers)
        for dtype in dtypes:
            rows.append(decode_row(packed.to(dtype), tokenizer, name, f"boa-w{bits}-{short(dtype)}", settings))
    return rows


def short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


# ----------------------------------------------------------------------------------------------- reporting


def print_rows(rows: list[dict], baselines: list[dict]) -> None:
    for b in baselines:
        print(f"  {b['op']:<4} {'×'.join(map(str, b['shape'])):<11} {b['kernel']:<10} {b['x_dtype']:<8} "
              f"{b['seconds'] * 1e6:10.1f} us {b['gbps']:7.1f} GB/s {b['bw_fraction']:6.2f}")
    for r in rows:
        def ratio(x):
            return f"{x:6.2f}x" if x is not None else " " * 7

        print(f"  {r['op']:<4} {'×'.join(map(str, r['shape'])):<11} {'boa-w' + str(r['bits']):<10} "
              f"{r['x_dtype']:<8} {r['seconds'] * 1e6:10.1f} us {r['gbps']:7.1f} GB/s {r['bw_fraction']:6.2f} "
              f"{ratio(r['speedup_fp32'])} {ratio(r['speedup_bf16'])} {ratio(r['speedup_torch_int4'])} "
              f"{r['rel_err']:.1e}", flush=True)


HEADER = (f"  {'op':<4} {'shape':<11} {'kernel':<10} {'x':<8} {'seconds':>13} {'read':>12} {'of bw':>6} "
          f"{'vs fp32':>7} {'vs bf16':>7} {'vs int4':>7} rel_err")
INT8_HEADER = (f"  {'op':<4} {'shape':<11} {'batch':>5} {'kernel':<10} {'seconds':>13} {'read':>12} {'of bw':>6} "
               f"{'vs bf16':>7} {'vs w4':>7} rel_err")


def print_int8_rows(rows: list[dict]) -> None:
    for r in rows:
        def ratio(key):
            return f"{r[key]:6.2f}x" if key in r else " " * 7

        error = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        print(f"  {r['op']:<4} {'×'.join(map(str, r['shape'])):<11} {r['batch']:>5} {r['kernel']:<10} "
              f"{r['seconds'] * 1e6:10.1f} us {r['gbps']:7.1f} GB/s {r['bw_fraction']:6.2f} "
              f"{ratio('speedup_bf16')} {ratio('speedup_boa_w4')} {error}", flush=True)


def print_hadamard_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"  hadamard {r['width']} ({r['core']}·{r['width'] // r['core']}) batch {r['batch']:>4}: "
              f"{r['seconds'] * 1e6:10.1f} us, {r['hadamard_fraction']:.3f} of down_proj "
              f"({r['down_proj_seconds'] * 1e6:.1f} us, {r['down_proj_kernel']}), rel_err {r['rel_err']:.1e}",
              flush=True)


def plot(path: Path, data: dict) -> None:
    """Speedup over torch fp32 per shape (batch 1 and 16) and decode tok/s per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(d["model"] for d in data["decode"]))
    fig = plt.figure(figsize=(14, 11 if models else 7.5))
    grid = fig.add_gridspec(3 if models else 2, max(1, len(models)))
    for i, batch in enumerate(BATCHES):
        plot_speedups(fig.add_subplot(grid[i, :]), data, batch)
    for j, name in enumerate(models):
        ax = fig.add_subplot(grid[2, j])
        rows = [d for d in data["decode"] if d["model"] == name]
        ax.bar(range(len(rows)), [d["tok_s"] for d in rows],
               color=["tab:gray" if d["engine"].startswith("transformers") else "tab:blue" for d in rows])
        ax.set_xticks(range(len(rows)), [d["engine"] for d in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("decode tok/s")
        ax.set_title(f"{name}: greedy decode, {data['machine']['threads']} threads")
    fig.suptitle(f"{data['machine']['cpu']}, {data['machine']['isa']}, copy bandwidth "
                 f"{data['machine']['copy_gbps']:.1f} GB/s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedups(ax, data: dict, batch: int) -> None:
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in data["results"]))
    fp32 = {tuple(b["shape"]): b["seconds"] for b in data["baselines"]
            if b["batch"] == batch and b["kernel"] == "torch-fp32"}
    series = [("torch-bf16", "bfloat16", "torch bf16", "0.55"), ("torch-int4", "float32", "torch int4, fp32 x", "0.35"),
              ("torch-int4", "bfloat16", "torch int4, bf16 x", "0.15")]
    series += [(bits, dtype, f"boa w{bits}, {short(getattr(torch, dtype))} x", color)
               for dtype, colors in (("float32", ("#9ecae1", "#4292c6", "#08519c")),
                                     ("bfloat16", ("#fdae6b", "#f16913", "#a63603")))
               for bits, color in zip(BITS, colors)]
    width = 0.85 / len(series)
    for k, (kind, dtype, label, color) in enumerate(series):
        rows = data["baselines"] if isinstance(kind, str) else data["results"]
        key = "kernel" if isinstance(kind, str) else "bits"
        seconds = {tuple(r["shape"]): r["seconds"] for r in rows
                   if r["batch"] == batch and r[key] == kind and r["x_dtype"] == dtype and r["device"] == "cpu"}
        values = [fp32[s] / seconds[s] if s in seconds else 0 for s in shapes]
        ax.bar([i + (k - len(series) / 2 + 0.5) * width for i in range(len(shapes))], values, width, label=label,
               color=color)
    ax.axhline(1, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(shapes)), [f"{o}×{n}" for o, n in shapes])
    ax.set_ylabel("speedup over torch fp32")
    ax.set_title(f"batch {batch} ({'gemv' if batch <= GEMV_MAX_BATCH else 'gemm'}), weights cold, "
                 f"groups of {GROUP}; int4 missing: in % 128 ≠ 0")
    ax.legend(fontsize=7, ncol=3)


# ---------------------------------------------------------------------------------------------------- main


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in item.strip().split("x")) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"--shapes {text!r} is not of the form OUTxIN[,OUTxIN...], e.g. 4096x4096") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="results file (rewritten after every shape and model)")
    parser.add_argument("--plot", help="PNG file (default: the JSON's path with .png)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--shapes", type=parse_shapes, help="OUTxIN,... (default: " +
                        ",".join(f"{o}x{n}" for o, n in SHAPES) + ")")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 (W8A8, W4A8) and Hadamard rows")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode rows")
    parser.add_argument("--quick", action="store_true", help="one small shape, short timings and decodes (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    shapes = args.shapes or SHAPES[:1 if args.quick else None]
    json_path = Path(args.json)
    plot_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")

    start = time.perf_counter()
    machine = {**host_machine(), "threads": torch.get_num_threads(), "isa": load_cpu().packed_isa(),
               "int8_isa": load_cpu().int8_isa(), "torch": torch.__version__, "loadavg_start": os.getloadavg(),
               "quick": args.quick, "seed": SEED}
    machine["copy_gbps"] = copy_gbps(settings)
    data = {"machine": machine, "results": [], "baselines": [], "int8": [], "hadamard": [], "decode": []}
    print(f"{machine['cpu']}, {machine['threads']} threads, kernels {machine['isa']}, torch {machine['torch']}, "
          f"copy {machine['copy_gbps']:.1f} GB/s, load {machine['loadavg_start'][0]:.2f}")
    print(HEADER)
    for shape in shapes:
        rows, baselines = bench_shape(shape, settings, machine["copy_gbps"])
        print_rows(rows, baselines)
        data["results"] += rows
        data["baselines"] += baselines
        write_json(json_path, data)
    if not args.no_int8:
        print(f"int8 kernels ({machine['int8_isa']}), W·A{A_BITS}; speedups over torch bf16 and boa's W4 (bf16 x):")
        print(INT8_HEADER)
        data["int8"] = bench_int8(settings, machine["copy_gbps"])
        print_int8_rows(data["int8"])
        data["hadamard"] = bench_hadamard(settings)
        print_hadamard_rows(data["hadamard"])
        write_json(json_path, data)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        machine.update(gpu=torch.cuda.get_device_name(device), gpu_copy_gbps=copy_gbps(settings, device))
        print(f"{machine['gpu']}: copy {machine['gpu_copy_gbps']:.1f} GB/s; speedups over torch fp32, fp16")
        for shape in shapes:
            rows = bench_shape_gpu(shape, settings, machine["gpu_copy_gbps"], device)
            print_rows([{**r, "speedup_bf16": r["speedup_fp16"]} for r in rows], [])
            data["results"] += rows
            write_json(json_path, data)
    if not args.no_decode:
        print("decode:")
        models = [("smollm2-135m", smollm2, (torch.float32, torch.bfloat16)),
                  (f"llama-random-{settings.llama_layers}L", lambda: random_llama(settings.llama_layers),
                   (torch.float32,))]
        for name, load, dtypes in models:
            data["decode"] += bench_decode(name, load, dtypes, settings)
            write_json(json_path, data)
    machine.update(loadavg_end=os.getloadavg(), wall_seconds=time.perf_counter() - start)
    write_json(json_path, data)
    plot(plot_path, data)
    print(f"{len(data['results'])} rows, {len(data['decode'])} decode rows in {machine['wall_seconds']:.0f} s: "
          f"{json_path}, {plot_path}")


if __name__ == "__main__":
    main()
