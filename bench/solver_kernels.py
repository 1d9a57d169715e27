"""Kernel benchmark: the solver's fused column pass and the inverse Cholesky factor against their torch references and
against loop formulations, on CPU (and on CUDA where torch sees a GPU).

    python bench/solver_kernels.py --json bench/results/kernels.json [--threads 1] [--quick] [--row-steps 8,1]

Every row is one timing: the best of a few repeats after one warm-up call, on random weights and SPD Hessians of
real layers' shapes (fixed seeds), float32 unless the row's dtype says otherwise. At start-up the column_loop
baseline is checked to give the same codes as obs_solve (float64, small problem).

op "compensate": one attention layer's column pass and row updates, bits 3, per-channel min-max grids, N = 1 (BoA)
    and 16 (TurboBoA), with U = chol(H⁻¹) and U_out precomputed (they are timed under inverse_cholesky), so that
    the rows compare the hot loop alone. shape = [heads, head_dim, cols] of the layer.
    backend torch | cpp | cuda | triton: obs_solve's row loop written with boa's public pieces (`kernel_pass`
        below: the fused column kernel boa_kernels.compensate_block_ on lazy blocks of 128 columns, as obs_solve's
        own column pass calls it, and `row_update`; the solver's column pass itself is private) with BOA_KERNELS set
        to it; torch is the column-at-a-time reference the kernels are tested against; a backend that cannot run
        here is left out.
    backend column_loop: the public BoA code's shape of computation (`column_loop` below): per row step, one
        column at a time in torch, each column's error updating all the layer's later columns at once (no lazy
        blocks), then the later rows by the solver's row_update.
    rows_timed: the weight rows solved. On CPU the Llama-3-8B layers solve only the rows of each head's first
        --row-steps row steps (the same rows for every backend), not the whole layer; on a GPU the whole layer.
op "turboboa_layer" / "gptq_layer": the whole public method.solve (obs_solve: factors, grids included) on each
    q_proj shape with the methods' defaults at 3 bits per channel (boa.TurboBoA(): the Hessian-weighted grid,
    N = 16, a random dX term D scaled by α, one scale refinement sweep; boa.GPTQ(): no row factor, min-max grid),
    per kernel backend; the rows as for compensate. "turboboa_fast_grid_layer": TurboBoA on grid="hessian-fast".
    On the sliced Llama rows, the cols × cols factor (~2 s on CPU) and TurboBoA's Hessian-weighted grid search
    (61 candidate scores, each a rows × cols × cols product) dominate.
op "inverse_cholesky": U = chol(H⁻¹) of a batch of damped SPD matrices, float32 and float64, shape = [batch, n, n].
    backend torch: ours, boa.core.hessian.inverse_cholesky_upper (chol(cholesky_inverse(chol(H))), upper, batched);
    flip: one Cholesky of the reversed matrix J H J = L Lᵀ and one triangular solve, U = J L⁻¹ J; loop: ours one
    matrix at a time (batched shapes only). max_rel_diff: max |U − U_ours| / max |U_ours|.

speedup_vs_torch / speedup_vs_column_loop: the baseline's seconds over the row's, both from this run on the same
device, op, shape, N and dtype. The baselines are backends torch and column_loop; for inverse_cholesky they are
ours (torch) and loop. Null where the group has no such baseline.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import boa
from boa.algorithms import obs_solve
from boa.algorithms.solver import row_update
from boa.core.hessian import damp, inverse_cholesky_upper
from boa.core.io import write_json
from boa.core.quantizer import QuantSpec, dequantize, find_grid, quantize
from boa.stats import LayerStats
from boa_kernels import compensate_block_
from boa_kernels.dispatch import ENV, backend_for

from _common import machine  # bench/ is sys.path[0] when run as a script

SEED = 0
BITS = 3
PERCDAMP = 0.01
COMPENSATE_N = (1, 16)
BLOCK_SIZE = 128  # the lazy-batch width: GPTQ's default, as obs_solve uses it
# Min-max grids, so that the grid search does not dilute the column pass's share of the time.
MINMAX = QuantSpec(BITS, grid="minmax")
# The methods timed whole, with their defaults (per-channel grids, as the compensate rows).
METHODS = {
    "turboboa": boa.TurboBoA(bits=BITS, group_size=-1),
    "turboboa_fast_grid": boa.TurboBoA(bits=BITS, group_size=-1, grid="hessian-fast"),
    "gptq": boa.GPTQ(bits=BITS, group_size=-1),
}
# Random Hessians: H = 2 S (GᵀG / RANK + RIDGE · I) S, channel scales S log-normal (activation outliers), correlations
# from the shared low-rank factor G: the Hessian of activations X = Z [G; √RIDGE·I] S of a real layer's width.
RANK = 64
RIDGE = 0.1
DX_SIZE = 0.01  # the random dX term relative to mean(diag H): small, as the earlier layers' rounding error is
KERNEL_BACKENDS = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}


@dataclass(frozen=True)
class Layer:
    name: str
    heads: int
    head_dim: int
    cols: int
    large: bool = False  # too slow for the torch paths on a CPU: time only the first row steps there

    @property
    def shape(self) -> list[int]:
        return [self.heads, self.head_dim, self.cols]


LAYERS = [
    Layer("smollm2 q_proj", 9, 64, 576),
    Layer("smollm2 k_proj", 3, 64, 576),
    Layer("smollm2 down_proj", 9, 64, 1536),  # an MLP input width; its rows taken as 9 heads for the bench's sake
    Layer("llama3-8b q_proj", 32, 128, 4096, large=True),
    Layer("llama3-8b k_proj", 8, 128, 4096, large=True),
]
# (batch, n): the row factors and input Hessians of those layers.
SMOLLM2_HESSIANS = [(9, 64), (1, 576), (1, 1536)]
LLAMA_HESSIANS = [(32, 128), (8, 128), (1, 4096)]
GPU_ONLY_HESSIANS = [(1, 14336)]  # Llama-3-8B's down_proj input: hours of LAPACK on 2 CPU cores


def random_spd(batch: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, n, n) float64 SPD matrices shaped like Hessians 2E[xxᵀ] of real activations (see RANK)."""
    scale = torch.exp(torch.randn(batch, n, 1, generator=generator, dtype=torch.float64))
    G = torch.randn(batch, RANK, n, generator=generator, dtype=torch.float64)
    C = G.transpose(-1, -2) @ G / RANK + RIDGE * torch.eye(n, dtype=torch.float64)
    return 2 * scale * C * scale.transpose(-1, -2)


def layer_problem(layer: Layer, rows_per_head: int, dtype: torch.dtype, device: str):
    """W (heads · rows_per_head, cols), H (cols, cols), H_out (heads, rows_per_head, rows_per_head) and a dX term D
    (cols, cols): the first rows of each head of the full layer's problem, so a slice times a part of the same
    solve."""
    g = torch.Generator().manual_seed(SEED)
    W = torch.randn(layer.heads, layer.head_dim, layer.cols, generator=g, dtype=torch.float64)
    H = random_spd(1, layer.cols, g)[0]
    H_out = random_spd(layer.heads, layer.head_dim, g)
    D = DX_SIZE * H.diagonal().mean() * torch.randn(layer.cols, layer.cols, generator=g, dtype=torch.float64)
    W = W[:, :rows_per_head].reshape(-1, layer.cols)
    H_out = H_out[:, :rows_per_head, :rows_per_head]
    return (x.to(device, dtype) for x in (W, H, H_out, D))


def factors(H: torch.Tensor, H_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U = chol(H⁻¹) and the row factors' U_out, as obs_solve computes them."""
    return inverse_cholesky_upper(H, PERCDAMP), inverse_cholesky_upper(H_out.to(H.dtype), PERCDAMP)


def kernel_pass(W: torch.Tensor, U: torch.Tensor, U_out: torch.Tensor, spec: QuantSpec,
                rows_per_step: int) -> torch.Tensor:
    """obs_solve's row loop for per-channel grids (no act-order, shared H) with the factors given, from boa's public
    pieces: every head's N rows of a step, as one matrix, run the column pass in lazy blocks of BLOCK_SIZE columns,
    each block through the fused kernel boa_kernels.compensate_block_ and followed by one GEMM on the later columns
    (what obs_solve's private column pass does); then the later rows move by row_update. Returns the codes."""
    heads, d, _ = U_out.shape
    cols = W.shape[-1]
    W = W.to(U.dtype).reshape(heads, d, cols).clone()
    blocks = [(i1, min(i1 + BLOCK_SIZE, cols)) for i1 in range(0, cols, BLOCK_SIZE)]
    U_blocks = [U[None, i1:i2, i1:i2].contiguous() for i1, i2 in blocks]  # made once, as obs_solve does
    group_of = torch.zeros(cols, dtype=torch.long, device=U.device)  # one grid per row
    codes = torch.empty_like(W)
    for r1 in range(0, d, rows_per_step):
        r2 = min(r1 + rows_per_step, d)
        W_B = W[:, r1:r2]
        scale, zero, _ = find_grid(W_B, spec)
        flat = (1, heads * (r2 - r1))
        Q = W_B.reshape(*flat, cols).clone()
        scale, zero = scale.reshape(*flat, 1).contiguous(), zero.reshape(*flat, 1).contiguous()
        C = torch.empty_like(Q)
        for (i1, i2), U1 in zip(blocks, U_blocks):
            W1 = Q[..., i1:i2].clone(memory_format=torch.contiguous_format)
            E1, C1 = torch.zeros_like(W1), torch.empty_like(W1)
            compensate_block_(W1, E1, C1, U1, scale, zero, group_of[i1:i2], spec.maxq, 0, i2 - i1)
            Q[..., i1:i2] = W1
            C[..., i1:i2] = C1
            Q[..., i2:] -= E1 @ U[None, i1:i2, i2:]
        codes[:, r1:r2] = C.reshape(heads, r2 - r1, cols)
        if r2 < d:
            W[:, r2:] += row_update(U_out, r1, r2, Q.reshape(heads, r2 - r1, cols) - W_B)
    return codes.reshape(-1, cols)


def column_loop(W: torch.Tensor, U: torch.Tensor, U_out: torch.Tensor, spec: QuantSpec,
                rows_per_step: int) -> torch.Tensor:
    """The same solve as kernel_pass, computed as the public BoA code does: for each step of N rows of every head,
    quantize one column at a time and subtract its error from all the layer's later columns at once, then move the
    later rows by row_update. Returns the codes."""
    heads, d, _ = U_out.shape
    cols = W.shape[-1]
    W = W.to(U.dtype).reshape(heads, d, cols).clone()
    codes = torch.empty_like(W)
    for r1 in range(0, d, rows_per_step):
        r2 = min(r1 + rows_per_step, d)
        W_B = W[:, r1:r2]
        Q_B = W_B.clone()
        scale, zero = (x[..., 0] for x in find_grid(Q_B, spec)[:2])
        for j in range(cols):
            w = Q_B[..., j]
            c = quantize(w, scale, zero, spec.maxq)
            codes[:, r1:r2, j] = c
            e = (w - dequantize(c, scale, zero)) / U[j, j]
            Q_B[..., j:] -= e[..., None] * U[j, j:]
        if r2 < d:
            W[:, r2:] += row_update(U_out, r1, r2, Q_B - W_B)
    return codes.reshape(-1, cols)


def check_formulations() -> None:
    """kernel_pass and column_loop must compute what obs_solve does, or their timings compare nothing: identical
    codes in float64 (several column blocks, the last one partial, and a last row step shorter than N)."""
    layer = Layer("check", heads=3, head_dim=10, cols=300)
    W, H, H_out, _ = layer_problem(layer, layer.head_dim, torch.float64, "cpu")
    U, U_out = factors(H, H_out)
    for N in (1, 4):
        expected = obs_solve(W, H, MINMAX, H_out=H_out, rows_per_step=N).codes
        for formulation in (kernel_pass, column_loop):
            if not torch.equal(formulation(W, U, U_out, MINMAX, N).to(torch.uint8), expected):
                raise SystemExit(f"{formulation.__name__}'s codes differ from obs_solve's (N={N})")


def flip(H: torch.Tensor) -> torch.Tensor:
    """U from one Cholesky and one triangular solve: J H J = L Lᵀ (J reverses the order) gives U = J L⁻¹ J."""
    L = torch.linalg.cholesky(damp(H, PERCDAMP).flip(-1, -2))
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device).expand_as(L)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(-1, -2)


def with_backend(backend: str, fn, *args, **kwargs):
    os.environ[ENV] = backend  # boa_kernels reads it on every call
    return fn(*args, **kwargs)


def runs_here(backend: str, device: str) -> bool:
    """Whether BOA_KERNELS=backend really runs that backend on device (not a fallback)."""
    os.environ[ENV] = backend
    return backend_for(device, ("cuda", "triton", "cpp")) == backend


@dataclass
class Timer:
    device: str
    max_repeats: int
    budget_s: float  # repeats stop at about this many seconds per timing (a slow call is timed once)

    def seconds(self, fn) -> float:
        first = self._once(fn)  # warm-up: builds, caches and first-call allocations
        repeats = max(1, min(self.max_repeats, int(self.budget_s / first)))
        return min(self._once(fn) for _ in range(repeats))

    def _once(self, fn) -> float:
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        return time.perf_counter() - start

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def group_rows(common: dict, seconds: dict[str, float], reference: str, loop: str, extra=None) -> list[dict]:
    """One row per backend of a group timed together, with the speedups over the group's baselines."""
    rows = []
    for backend, s in seconds.items():
        rows.append({
            **common, "backend": backend, "seconds": s,
            "speedup_vs_torch": seconds[reference] / s if reference in seconds else None,
            "speedup_vs_column_loop": seconds[loop] / s if loop in seconds else None,
            **(extra or {}).get(backend, {}),
        })
    return rows


def bench_compensate(timer: Timer, layer: Layer, N: int, rows_per_head: int, backends: list[str]) -> list[dict]:
    W, H, H_out, _ = layer_problem(layer, rows_per_head, torch.float32, timer.device)
    U, U_out = factors(H, H_out)
    seconds = {"column_loop": timer.seconds(lambda: column_loop(W, U, U_out, MINMAX, N))}
    for backend in backends:
        seconds[backend] = timer.seconds(lambda: with_backend(backend, kernel_pass, W, U, U_out, MINMAX, N))
    common = {"device": timer.device, "op": "compensate", "layer": layer.name, "shape": layer.shape, "N": N,
              "dtype": "float32", "rows_timed": W.shape[0]}
    return group_rows(common, seconds, "torch", "column_loop")


def bench_method(timer: Timer, name: str, layer: Layer, rows_per_head: int, backends: list[str]) -> list[dict]:
    """The method's own solve (its defaults), on the statistics it needs: the row factors only for a method that
    needs the attention, the dX term D (scaled by the method's α inside) only for one that needs it."""
    method = METHODS[name]
    needs = method.needs()
    W, H, H_out, D = layer_problem(layer, rows_per_head, torch.float32, timer.device)
    stats = LayerStats(H, H_out=H_out if needs.attention else None, D=D if needs.dx else None)
    seconds = {backend: timer.seconds(lambda: with_backend(backend, method.solve, W, stats))
               for backend in backends}
    common = {"device": timer.device, "op": f"{name}_layer", "layer": layer.name, "shape": layer.shape,
              "N": method.rows_per_step if needs.attention else None, "dtype": "float32",
              "rows_timed": W.shape[0]}
    return group_rows(common, seconds, "torch", "column_loop")


def bench_inverse(timer: Timer, batch: int, n: int, dtype: torch.dtype) -> list[dict]:
    H = random_spd(batch, n, torch.Generator().manual_seed(SEED)).to(timer.device, dtype)
    forms = {"torch": lambda: inverse_cholesky_upper(H, PERCDAMP), "flip": lambda: flip(H)}
    if batch > 1:
        forms["loop"] = lambda: torch.stack([inverse_cholesky_upper(h, PERCDAMP) for h in H])
    ours = forms["torch"]()
    scale = ours.abs().amax()
    extra = {name: {"max_rel_diff": float((form() - ours).abs().amax() / scale)} for name, form in forms.items()}
    seconds = {name: timer.seconds(form) for name, form in forms.items()}
    common = {"device": timer.device, "op": "inverse_cholesky", "layer": None, "shape": [batch, n, n], "N": None,
              "dtype": str(dtype).removeprefix("torch."), "rows_timed": None}
    return group_rows(common, seconds, "torch", "loop", extra)


def print_rows(rows: list[dict]) -> None:
    def ratio(x):
        return f"{x:7.2f}x" if x is not None else " " * 8

    for r in rows:
        shape = r["layer"] or "×".join(map(str, r["shape"]))
        N = r["N"] if r["N"] is not None else "-"
        rows_timed = r["rows_timed"] if r["rows_timed"] is not None else "-"
        diff = f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else ""
        print(f"{r['device']:<5} {r['op']:<16} {shape:<18} {N:>3} {r['dtype']:<8} {r['backend']:<11} "
              f"{rows_timed:>5} {r['seconds']:10.4f} {ratio(r['speedup_vs_torch'])} "
              f"{ratio(r['speedup_vs_column_loop'])} {diff}", flush=True)


HEADER = (f"{'dev':<5} {'op':<16} {'shape':<18} {'N':>3} {'dtype':<8} {'backend':<11} {'rows':>5} "
          f"{'seconds':>10} {'vs torch':>8} {'vs loop':>8} max_rel_diff")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="results file (rewritten after every group of rows)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, fewer repeats (a smoke run)")
    parser.add_argument("--row-steps", default="8,1", metavar="N1,N16",
                        help="row steps per head timed on CPU for the Llama-3-8B layers, at N = 1 and at N = 16")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    row_steps = dict(zip(COMPENSATE_N, map(int, args.row_steps.split(","))))
    layers = [layer for layer in LAYERS if not (args.quick and layer.large)]
    hessians = SMOLLM2_HESSIANS + ([] if args.quick else LLAMA_HESSIANS)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    info = {**machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "quick": args.quick, "row_steps": row_steps, "seed": SEED}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    results: list[dict] = []
    start = time.perf_counter()
    check_formulations()
    print(HEADER)
    for device in devices:
        timer = Timer(device, max_repeats=2 if args.quick else 5, budget_s=0.5 if args.quick else 10.0)
        backends = [b for b in ("torch", *KERNEL_BACKENDS[device]) if runs_here(b, device)]

        def rows_per_head(layer: Layer, N: int) -> int:
            sliced = layer.large and device == "cpu"
            return min(layer.head_dim, N * row_steps[N]) if sliced else layer.head_dim

        def record(rows: list[dict]) -> None:
            print_rows(rows)
            results.extend(rows)
            write_json(Path(args.json), {"device_info": info, "results": results})

        for layer in layers:
            for N in COMPENSATE_N:
                record(bench_compensate(timer, layer, N, rows_per_head(layer, N), backends))
        for layer in (layer for layer in layers if layer.name.endswith("q_proj")):
            for method in METHODS:
                record(bench_method(timer, method, layer, rows_per_head(layer, 16), backends))
        for batch, n in hessians + (GPU_ONLY_HESSIANS if device == "cuda" and not args.quick else []):
            for dtype in (torch.float32, torch.float64):
                record(bench_inverse(timer, batch, n, dtype))
    info["wall_seconds"] = time.perf_counter() - start
    write_json(Path(args.json), {"device_info": info, "results": results})
    print(f"{len(results)} rows in {info['wall_seconds']:.0f} s: {args.json}")


if __name__ == "__main__":
    main()
