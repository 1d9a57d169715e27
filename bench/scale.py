"""How boa's streamed quantization scales: peak memory and time against model size, calibration size, activation
placement, processes and device (issue 19, item 6).

    python bench/scale.py                                    # every section at full size: hours on 2 cores
    python bench/scale.py --sections smollm2 --merge         # one section again, keeping the others in the JSON
    python bench/scale.py --quick --json /tmp/scale-quick.json   # everything tiny: a few minutes, a smoke test

Exit status 1 when a section or a run failed (its error is in the JSON and the others' results are kept).

Sections (--sections, comma-separated):
  llama8b   Llama-3-8B-shaped checkpoints (random bf16 weights, written once under --work-dir and reused) with
            --blocks decoder blocks, each quantized by every --methods entry in a process of its own through the
            public API (StreamedModel.open -> boa.quantize(out=...) -> boa.save) on seeded random token windows.
            Then the memory model: one method at the fewest blocks on several calibration sizes (--model-sizes),
            peak RSS fitted as a + b*tokens, predicted at --predict tokens, plus a run with --offload disk; the
            flatness of the peak over block counts, and the peak against one block + caches + embeddings.
  llama70b  one Llama-2-70B-shaped block, if a scaled-down pilot says it fits in the free memory.
  smollm2   the packaged SmolLM2-135M through `boa quantize` with 1 and with 2 gloo processes (--nproc 2): wall
            time and perplexity side by side.
  gpu       the llama8b run at the fewest blocks on CUDA (blocks per minute, peak allocated device memory); without
            CUDA the section records why it was skipped, and with --quick runs the same code on the CPU.

Every run reports its own peak resident memory (getrusage ru_maxrss) and, sampled from /proc/self/status every
20 ms, its anonymous part (RssAnon: what the process allocated) beside the file-backed part (RssFile: the shared
libraries, about 0.2 GiB, and every page of the safetensors shards read so far: boa's reader keeps the shards
mapped for the whole run and the fingerprint reads all of them, so this part grows with the checkpoint, though the
kernel can drop those pages again under pressure); shard_pages_gib is the latter alone.
The JSON (--json) is rewritten after every section; a readable table goes to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

import boa

from _common import parse_settings, setting_label  # bench/ is sys.path[0] when run as a script

SECTIONS = ("llama8b", "llama70b", "smollm2", "gpu")
GIB = 2**30

# Llama-3-8B and Llama-2-70B as their config.json describe them (layers set per checkpoint).
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                 tie_word_embeddings=False)
LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                  tie_word_embeddings=False)
# --quick: the same architecture, tiny (head_dim 64 and 128 as above, so TurboBoA's 16 rows a step fit a head)
QUICK_8B = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=1000)
QUICK_70B = dict(LLAMA2_70B, hidden_size=512, intermediate_size=1792, num_attention_heads=4, num_key_value_heads=1,
                 vocab_size=1000)
INIT = "normal(0, 0.02) for matrices, ones for norms, one generator per tensor seeded by (seed, name)"

SMOLLM2_NOTE = (
    "Two processes on {cores} shared cores are not expected to be faster than one: torchrun starts each with "
    "OMP_NUM_THREADS=1, so together they use the {cores} cores the single process already keeps busy with its "
    "{threads} intra-op threads (its forward passes, Hessian products and solves are multi-threaded). Each of the "
    "two does half the forward passes and solves the layers it owns, but the work on the cores is the same in total, "
    "and on top come a second start-up and copy of the model and gloo's all-reduce of every Hessian and broadcast of "
    "every solved layer. What the pair shows here is that the result agrees (the perplexities); a speed-up needs "
    "cores (or GPUs) beyond what one process uses. On a busy machine the single process's threads also wait on each "
    "other when another program takes a core, which can tilt the comparison either way: measure on a quiet one.")


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def gib(nbytes: float | None) -> float | None:
    return None if nbytes is None else round(nbytes / GIB, 3)


# ---------------------------------------------------------------------------------------------------------------
# parsing


def parse_methods(text: str) -> list[dict]:
    """"gptq-w4g128,turboboa-w3" -> [{"method": "gptq", "bits": 4, "group_size": 128, "label": ...}, ...]."""
    from boa.algorithms import REGISTRY

    methods = []
    for item in text.split(","):
        name, sep, setting = item.strip().partition("-")
        if not sep or name not in REGISTRY:
            raise SystemExit(f"--methods entry {item!r}: give METHOD-wBITS[gGROUP] with METHOD one of "
                             f"{', '.join(REGISTRY)}, e.g. gptq-w4g128 or turboboa-w3")
        (bits, group_size), = parse_settings(setting)
        methods.append({"method": name, "bits": bits, "group_size": group_size,
                        "label": f"{name}-{setting_label(bits, group_size)}"})
    return methods


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"8x512,16x512" -> [(8, 512), (16, 512)]: calibration windows x tokens each."""
    sizes = []
    for item in text.split(","):
        n, sep, seqlen = item.strip().partition("x")
        try:
            sizes.append((int(n), int(seqlen)))
        except ValueError:
            raise SystemExit(f"calibration size {item!r} is not of the form NSAMPLESxSEQLEN, e.g. 16x512") from None
    return sizes


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def method_config(entry: dict):
    from boa.algorithms import method_from_dict

    return method_from_dict({"method": entry["method"], "bits": entry["bits"], "group_size": entry["group_size"]})


# ---------------------------------------------------------------------------------------------------------------
# machine


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "boa": boa.__version__,
            "python": platform.python_version(), "total_ram_gib": gib(meminfo("MemTotal")),
            "available_ram_gib_at_start": gib(meminfo("MemAvailable")),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["boa_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                            capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def meminfo(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------------------------
# checkpoints with random weights, written one tensor at a time


def llama_config(shape: dict, layers: int):
    from transformers import LlamaConfig

    config = LlamaConfig(**shape, num_hidden_layers=layers)
    config.dtype = torch.bfloat16
    return config


def skeleton(config):
    """The model on the meta device: names and shapes, no storage."""
    from boa.models import adapter_for
    from boa.models.weights import empty_model

    return empty_model(config, adapter_for(config), torch.bfloat16)


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """ones for a norm, else normal(0, 0.02) in bf16, drawn in row chunks (an fp32 copy of a 128256 x 4096
    embedding would take 2 GB)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(_tensor_seed(seed, name))
    rows = max(1, (1 << 24) // math.prod(shape[1:]))
    for start in range(0, shape[0], rows):
        chunk = out[start:start + rows]
        chunk.copy_(torch.randn(chunk.shape, generator=generator).mul_(0.02))
    return out


def checkpoint_bytes(config) -> int:
    return sum(p.numel() * p.element_size() for p in skeleton(config).parameters())


def write_checkpoint(work_dir: Path, tag: str, shape: dict, layers: int, seed: int) -> Path:
    """A Llama checkpoint of `layers` blocks with random bf16 weights under work_dir, written once (5 GB shards,
    config.json) and reused while its marker matches. Block i's tensors are the same whatever `layers` is."""
    from boa.core.shards import ShardWriter

    spec = {"shape": shape, "layers": layers, "seed": seed, "init": INIT}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    folder = work_dir / f"{tag}-{layers}blocks-{key}"
    marker = folder / "bench-scale.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder
    config = llama_config(shape, layers)
    need = checkpoint_bytes(config)
    work_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work_dir).free
    if free < 2.2 * need:  # the writer's data file and the shard it becomes, briefly both
        raise RuntimeError(f"writing {folder.name} needs about {2.2 * need / GIB:.1f} GiB free in {work_dir}; "
                           f"{free / GIB:.1f} GiB are")
    log(f"writing {folder.name}: {need / GIB:.2f} GiB of random bf16 weights (once; reused afterwards)")
    start = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.writing-", dir=work_dir))
    try:
        writer = ShardWriter(tmp, max_shard_bytes=5 * 1000**3)
        for name, param in skeleton(config).named_parameters():
            writer.add(name, _random_tensor(name, tuple(param.shape), seed))
        writer.finish()
        config.save_pretrained(tmp)
        (tmp / marker.name).write_text(json.dumps(spec, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {folder.name} in {time.perf_counter() - start:.0f} s")
    return folder


def shape_sizes(config, entry: dict, tokens: int) -> dict:
    """Bytes from the shapes alone: one block's weights in bf16, the input embedding in bf16, and the activation
    caches boa keeps at their peak (a block's inputs and outputs, both paths with the dX correction, in the cache
    dtype); their sum is what a streamed run holds at least."""
    model = skeleton(config)
    block = sum(p.numel() for p in model.model.layers[0].parameters()) * 2
    embeddings = model.get_input_embeddings().weight.numel() * 2
    quant = boa.QuantConfig(method_config(entry))
    paths = 2 if quant.method.needs().dx else 1
    caches = tokens * config.hidden_size * getattr(torch, quant.cache_dtype).itemsize * 2 * paths
    return {"block_bf16": block, "embeddings_bf16": embeddings, "activation_caches": caches,
            "cache_bytes_per_token": caches // tokens, "sum": block + embeddings + caches}


# ---------------------------------------------------------------------------------------------------------------
# one quantization run, in a process of its own


class MemoryPoller(threading.Thread):
    """Samples this process's VmRSS, RssAnon and RssFile every `interval` seconds; keeps each one's peak per phase."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self.phase, self.peaks = interval, "start", {}
        self._done = threading.Event()

    def sample(self) -> None:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in self.FIELDS:
                    values[key] = int(rest.split()[0]) * 1024
        peaks = self.peaks.setdefault(self.phase, dict.fromkeys(self.FIELDS, 0))
        for key, value in values.items():
            peaks[key] = max(peaks[key], value)

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.sample()

    def peak(self, field: str) -> int:
        return max(p[field] for p in self.peaks.values())


def child_main(spec_path: Path, result_path: Path) -> int:
    """Runs one quantization as `spec` says and writes its record to result_path."""
    spec = json.loads(spec_path.read_text())
    poller = MemoryPoller()
    poller.start()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out = Path(spec["out"])
    try:
        from transformers import AutoConfig

        from boa.models import StreamedModel, adapter_for

        device = torch.device(spec["device"])
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        config = AutoConfig.from_pretrained(spec["folder"])
        poller.enter("open")
        start = time.perf_counter()
        streamed = StreamedModel.open(spec["folder"], config, adapter_for(config), dtype=torch.bfloat16,
                                      device=device)
        generator = torch.Generator().manual_seed(spec["seed"])
        calib = torch.randint(0, config.vocab_size, (spec["nsamples"], spec["seqlen"]), generator=generator)
        poller.enter("quantize")
        opened = time.perf_counter()
        done = []

        def block_done(index: int) -> None:
            if cuda:
                torch.cuda.synchronize(device)
            done.append(time.perf_counter())

        result = boa.quantize(streamed, method_config(spec), calib, device=device, offload=spec["offload"],
                              offload_dir=spec["offload_dir"], out=out, progress=False, on_block_done=block_done)
        if cuda:
            torch.cuda.synchronize(device)
        quantized = time.perf_counter()
        cuda_quantize = torch.cuda.max_memory_allocated(device) if cuda else None
        poller.enter("save")
        boa.save(result, out, max_shard_size=spec["max_shard_size"])
        saved = time.perf_counter()
        poller.stop()
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        blocks = config.num_hidden_layers
        marks = [opened, *done]
        block_seconds = [round(b - a, 3) for a, b in zip(marks, marks[1:])]
        record = {
            "method": spec["method"], "bits": spec["bits"], "group_size": spec["group_size"], "label": spec["label"],
            "blocks": blocks, "nsamples": spec["nsamples"], "seqlen": spec["seqlen"],
            "tokens": spec["nsamples"] * spec["seqlen"], "offload": spec["offload"], "device": str(device),
            "threads": torch.get_num_threads(),
            "peak_rss_gib": gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
            "peak_rss_anon_gib": gib(poller.peak("RssAnon")),
            "peak_rss_file_gib": gib(poller.peak("RssFile")),
            # file pages mapped beyond those at open (the libraries): the safetensors shards' pages
            "shard_pages_gib": gib(poller.peak("RssFile") - poller.peaks["open"]["RssFile"]),
            "phase_peaks_gib": {phase: {k: gib(v) for k, v in p.items()} for phase, p in poller.peaks.items()},
            "open_seconds": round(opened - start, 3),
            "quantize_seconds": round(quantized - opened, 3),
            "seconds_per_block": round((quantized - opened) / blocks, 3),
            "block_seconds": block_seconds,  # the first one includes the fingerprint and the capture of block 0
            "save_seconds": round(saved - quantized, 3),
            "total_seconds": round(saved - start, 3),
            "output_bytes": size, "output_gib": gib(size),
        }
        if cuda:
            record.update(cuda_max_allocated_gib=gib(torch.cuda.max_memory_allocated(device)),
                          cuda_max_allocated_quantize_gib=gib(cuda_quantize),
                          blocks_per_minute=round(60 * blocks / (quantized - opened), 3))
        result_path.write_text(json.dumps(record) + "\n")
        return 0
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(f"{out}.partial", ignore_errors=True)


class Runner:
    """Starts each quantization in a process of its own (so that its peak memory is its own) under a temporary
    folder that is removed afterwards; identical runs within one invocation are run once."""

    def __init__(self, args):
        self.args = args
        self.tmp_root = Path(args.tmp_dir or args.work_dir / "runs")
        self._done: dict[str, dict] = {}

    def run(self, folder: Path, entry: dict, nsamples: int, seqlen: int, offload: str, device: str = "cpu") -> dict:
        spec = {"folder": str(folder), **{k: entry[k] for k in ("method", "bits", "group_size", "label")},
                "nsamples": nsamples, "seqlen": seqlen, "seed": self.args.seed, "offload": offload,
                "device": device, "threads": self.args.threads, "max_shard_size": "5GB"}
        key = json.dumps(spec, sort_keys=True)
        if key in self._done:
            return self._done[key]
        what = f"{entry['label']} on {folder.name}, {nsamples}x{seqlen}, offload {offload}, {device}"
        log(f"run: {what}")
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="run-", dir=self.tmp_root))
        spec.update(out=str(tmp / "out"), offload_dir=str(tmp / "activations"))
        (tmp / "spec.json").write_text(json.dumps(spec))
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(tmp / "spec.json"),
                                   "--child-result", str(tmp / "result.json")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            result = tmp / "result.json"
            if proc.returncode == 0 and result.is_file():
                record = json.loads(result.read_text())
            else:
                why = (f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
                       else f"exit {proc.returncode}")
                record = {"label": entry["label"], "blocks": None, "nsamples": nsamples, "seqlen": seqlen,
                          "offload": offload, "device": device, "error": f"{why}: {proc.stderr.strip()[-2000:]}"}
                log(f"FAILED {what}: {record['error'][-500:]}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        record["process_seconds"] = round(time.perf_counter() - start, 3)
        record["checkpoint"] = folder.name
        if "error" not in record:
            log(f"  peak {record['peak_rss_gib']:.2f} GiB (anon {record['peak_rss_anon_gib']:.2f}), quantize "
                f"{record['quantize_seconds']:.1f} s ({record['seconds_per_block']:.1f} s/block), save "
                f"{record['save_seconds']:.1f} s, output {record['output_gib']:.3f} GiB")
        self._done[key] = record
        return record

    def cleanup(self) -> None:
        try:
            self.tmp_root.rmdir()  # only when empty: never anything this script did not make
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------------------------
# fits


def least_squares(rows: list[list[float]], y: list[float]) -> list[float] | None:
    """Coefficients of y ~ rows @ c (float64), or None when the columns do not determine them."""
    A, b = torch.tensor(rows, dtype=torch.float64), torch.tensor(y, dtype=torch.float64).unsqueeze(1)
    if torch.linalg.matrix_rank(A) < A.shape[1]:
        return None
    return torch.linalg.lstsq(A, b, driver="gelsd").solution.squeeze(1).tolist()


def fit_tokens(points: list[dict], field: str, target_tokens: int) -> dict:
    """peak = a + b * tokens over `points` (each has tokens and `field` in GiB)."""
    coef = least_squares([[1.0, p["tokens"]] for p in points], [p[field] * GIB for p in points])
    if coef is None:
        return {"skipped": "needs at least two different token counts"}
    a, b = coef
    residuals = [p[field] * GIB - (a + b * p["tokens"]) for p in points]
    return {"model": "peak = a + b * tokens", "points": len(points), "a_gib": gib(a), "b_bytes_per_token": round(b),
            "max_residual_gib": gib(max(abs(r) for r in residuals)),
            "predicted_gib": gib(a + b * target_tokens)}


def fit_tokens_and_batch(points: list[dict], field: str, batch: int, target: tuple[int, int]) -> dict:
    """peak = a + b * tokens + c * (one forward batch's tokens: `batch` windows x seqlen), when the points vary
    both; the batch term is the per-batch working set (MLP and attention intermediates, a layer's input for its
    Hessian), which grows with seqlen but not with the number of windows."""
    rows = [[1.0, p["tokens"], min(batch, p["nsamples"]) * p["seqlen"]] for p in points]
    coef = least_squares(rows, [p[field] * GIB for p in points])
    if coef is None:
        return {"skipped": "the sizes do not vary the batch's tokens apart from the total (add e.g. 8x1024 to "
                           "--model-sizes)"}
    a, b, c = coef
    n, seqlen = target
    return {"model": f"peak = a + b * tokens + c * batch_tokens (batch_tokens = min({batch}, nsamples) * seqlen)",
            "points": len(points), "a_gib": gib(a), "b_bytes_per_token": round(b),
            "c_bytes_per_batch_token": round(c),
            "predicted_gib": gib(a + b * n * seqlen + c * min(batch, n) * seqlen)}


# ---------------------------------------------------------------------------------------------------------------
# sections


def section_llama8b(args, runner: Runner) -> dict:
    shape = QUICK_8B if args.quick else LLAMA3_8B
    methods = parse_methods(args.methods)
    blocks = sorted(parse_ints(args.blocks))
    folders = {n: write_checkpoint(args.work_dir, "llama8b", shape, n, args.seed) for n in blocks}
    runs = [runner.run(folders[n], entry, args.nsamples, args.seqlen, args.offload)
            for n in blocks for entry in methods]
    config = llama_config(shape, blocks[0])
    for record in runs:
        if "error" not in record:
            sizes = shape_sizes(config, next(m for m in methods if m["label"] == record["label"]), record["tokens"])
            record["shape_bytes"] = sizes
            record["peak_over_shapes"] = round(record["peak_rss_gib"] * GIB / sizes["sum"], 3)
            record["anon_peak_over_shapes"] = round(record["peak_rss_anon_gib"] * GIB / sizes["sum"], 3)

    flatness = []
    for entry in methods:
        ok = {r["blocks"]: r for r in runs if r["label"] == entry["label"] and "error" not in r}
        if len(ok) >= 2:
            lo, hi = min(ok), max(ok)
            flatness.append({"method": entry["label"], "blocks": [lo, hi],
                             "peak_ratio": round(ok[hi]["peak_rss_gib"] / ok[lo]["peak_rss_gib"], 3),
                             "anon_peak_ratio": round(ok[hi]["peak_rss_anon_gib"] / ok[lo]["peak_rss_anon_gib"], 3),
                             "file_peak_gib": [ok[lo]["peak_rss_file_gib"], ok[hi]["peak_rss_file_gib"]]})
    return {"shape": shape, "init": INIT, "checkpoints": {str(n): str(f) for n, f in folders.items()},
            "checkpoint_gib": {str(n): gib(checkpoint_bytes(llama_config(shape, n))) for n in blocks},
            "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "ids": "uniform random token ids, seeded"},
            "runs": runs,
            "flatness": {"definition": "peak at the most blocks / peak at the fewest, per method: 1.0 means the "
                                       "peak does not grow with the model (peak_ratio: ru_maxrss, shard pages "
                                       "included; anon_peak_ratio: allocated memory only)", "methods": flatness},
            "peak_over_shapes_definition": "each run's peak / (one block's weights in bf16 + the input embedding "
                                           "in bf16 + the activation caches: inputs and outputs of a block, both "
                                           "paths with dX, in the cache dtype), from the shapes (shape_bytes)",
            "memory_model": memory_model(args, runner, shape, folders[blocks[0]], methods)}


def memory_model(args, runner: Runner, shape: dict, folder: Path, methods: list[dict]) -> dict:
    from boa.pipeline.inputs import FORWARD_BATCH

    entry = parse_methods(args.model_method)[0] if args.model_method else methods[0]
    sizes = parse_sizes(args.model_sizes)
    target = parse_sizes(args.predict)[0]
    config = llama_config(shape, json.loads((folder / "bench-scale.json").read_text())["layers"])
    points = []
    for n, seqlen in sizes:
        record = runner.run(folder, entry, n, seqlen, "device")
        if "error" not in record:
            points.append(record)
    summary = [{k: p[k] for k in ("nsamples", "seqlen", "tokens", "peak_rss_gib", "peak_rss_anon_gib",
                                  "peak_rss_file_gib", "quantize_seconds")} for p in points]
    if not points:
        return {"method": entry["label"], "skipped": "every run failed", "points": summary}
    common = statistics.mode(p["seqlen"] for p in points)
    same_seqlen = [p for p in points if p["seqlen"] == common]
    tokens = target[0] * target[1]
    per_token = shape_sizes(config, entry, tokens)["cache_bytes_per_token"]
    fits = {"rss": fit_tokens(same_seqlen, "peak_rss_gib", tokens),
            "anon": fit_tokens(same_seqlen, "peak_rss_anon_gib", tokens),
            "rss_with_batch": fit_tokens_and_batch(points, "peak_rss_gib", FORWARD_BATCH, target),
            "anon_with_batch": fit_tokens_and_batch(points, "peak_rss_anon_gib", FORWARD_BATCH, target)}
    for fit in fits.values():
        if "b_bytes_per_token" in fit:
            fit["b_over_expected"] = round(fit["b_bytes_per_token"] / per_token, 3)

    # --offload disk: the caches leave memory; what stays is the fixed part and the batches in flight
    largest = max(points, key=lambda p: p["tokens"])
    disk = runner.run(folder, entry, largest["nsamples"], largest["seqlen"], "disk")
    live = 3  # batches in host memory at once: the one being used, the one read ahead, the output being written
    batch_bytes = per_token // 2 * FORWARD_BATCH  # one batch of inputs (both paths with dX) per token of seqlen
    disk_model = {
        "derivation": (
            f"with --offload disk the activation caches are files; host memory holds the fixed part a (weights of "
            f"one block, statistics, solver buffers, one forward batch's intermediates) plus about {live} batches "
            f"of cached activations in flight (the batch being used, the one read ahead, the output being "
            f"written): predicted = a + {live} * {FORWARD_BATCH} windows * seqlen * {per_token // 2} bytes (the "
            f"cache bytes per token of one copy, from the shapes). a is the fit's intercept at the fit's seqlen "
            f"({common}); at another seqlen the forward batch's share of a changes with it (rss_with_batch/"
            f"anon_with_batch fit it where the sizes allow)."),
        "live_batches": live, "batch_bytes_per_seqlen_token": batch_bytes}
    if "error" in disk:
        disk_model["measured"] = {"error": disk["error"]}
    else:
        disk_model["measured"] = {k: disk[k] for k in ("nsamples", "seqlen", "tokens", "peak_rss_gib",
                                                       "peak_rss_anon_gib", "peak_rss_file_gib", "quantize_seconds")}
        disk_model["device_at_same_size"] = {k: largest[k] for k in ("peak_rss_gib", "peak_rss_anon_gib",
                                                                     "quantize_seconds")}
    for name in ("rss", "anon"):
        fit = fits[name]
        if "a_gib" not in fit:
            continue
        a = fit["a_gib"] * GIB
        disk_model[f"predicted_{name}_gib_at_measured_size"] = gib(a + live * batch_bytes * largest["seqlen"])
        disk_model[f"predicted_{name}_gib_at_target"] = gib(a + live * batch_bytes * target[1])
        with_batch = fits[f"{name}_with_batch"]
        if "c_bytes_per_batch_token" in with_batch:
            disk_model[f"predicted_{name}_gib_at_target_with_batch"] = gib(
                with_batch["a_gib"] * GIB + with_batch["c_bytes_per_batch_token"] * min(FORWARD_BATCH, target[0])
                * target[1] + live * batch_bytes * target[1])
    if "measured" in disk_model and "error" not in disk_model["measured"] and "a_gib" in fits["rss"]:
        disk_model["measured_over_predicted_rss"] = round(
            disk["peak_rss_gib"] / disk_model["predicted_rss_gib_at_measured_size"], 3)
    return {"method": entry["label"], "blocks": config.num_hidden_layers, "offload": "device",
            "target": {"nsamples": target[0], "seqlen": target[1], "tokens": tokens},
            "expected_b_bytes_per_token": per_token,
            "expected_b_definition": "cache bytes per token from the shapes: hidden_size x cache dtype bytes x 2 "
                                     "(a block's inputs and outputs coexist while it runs), x 2 again for a "
                                     "method with dX (the FP path's caches)",
            "fits_over": f"rss/anon: the runs at seqlen {common}; *_with_batch: all runs",
            "carry_over": "the fits describe this checkpoint: the rss intercept includes its shard pages (the runs' "
                          "shard_pages_gib), which grow with the checkpoint while the anon fit does not; for a "
                          "full-depth model add its extra checkpoint size to an rss prediction (pages the kernel "
                          "can drop again) or read the anon one",
            "points": summary, "fits": fits, "disk": disk_model}


def scaled_shape(shape: dict, scale: float) -> dict:
    """The shape with about `scale` of its width: heads scaled (head_dim kept), intermediate to a multiple of 128."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    heads = max(1, round(shape["num_attention_heads"] * scale))
    return dict(shape, num_attention_heads=heads, num_key_value_heads=math.gcd(shape["num_key_value_heads"], heads),
                hidden_size=heads * head_dim,
                intermediate_size=max(128, round(shape["intermediate_size"] * scale / 128) * 128))


def section_llama70b(args, runner: Runner) -> dict:
    """One Llama-2-70B-shaped block, guarded: the same runs on the block at two smaller widths first, their peak
    anonymous memory fitted as p + q * width^2 (weights, Hessians and solver buffers grow with the square; the
    linear parts, caches and embeddings, come out overestimated, which errs on the safe side) and extrapolated."""
    shape = QUICK_70B if args.quick else LLAMA2_70B
    methods = parse_methods(args.methods_70b)
    n, seqlen = parse_sizes(args.calib_70b)[0]
    scales = [float(s) for s in args.pilot_scales.split(",")]
    pilots = {}
    for s in scales:
        small = scaled_shape(shape, s)
        pilots[small["hidden_size"] / shape["hidden_size"]] = (small, write_checkpoint(
            args.work_dir, "llama70b-pilot", small, 1, args.seed))
    if len(pilots) < 2:
        raise SystemExit(f"--pilot-scales {args.pilot_scales} give fewer than two distinct widths of this shape")
    full_config = llama_config(shape, 1)
    need_disk = checkpoint_bytes(full_config)
    out = {"shape": shape, "init": INIT, "calibration": {"nsamples": n, "seqlen": seqlen},
           "checkpoint_gib": gib(need_disk), "guard": [], "runs": []}
    folder = None
    too_big = []  # (label, needs) of methods the guard skipped for memory
    for entry in methods:
        needs = method_config(entry).needs()
        covered = next((label for label, smaller in too_big if all(
            getattr(needs, f) >= getattr(smaller, f) for f in ("hessian", "attention", "dx"))), None)
        if covered:  # its pilots would take long to say the same
            out["guard"].append({"method": entry["label"], "skipped": (
                f"{covered} was estimated not to fit, and {entry['label']} gathers at least the statistics it does "
                "(Needs: hessian, attention, dx), so it needs at least as much memory")})
            log(f"llama70b {entry['label']}: skipped: {out['guard'][-1]['skipped']}")
            continue
        measured = [(s, runner.run(f, entry, n, seqlen, args.offload)) for s, (small, f) in sorted(pilots.items())]
        ok = [(s, r) for s, r in measured if "error" not in r]
        guard = {"method": entry["label"],
                 "pilots": [{"width_scale": round(s, 4), "hidden_size": pilots[s][0]["hidden_size"],
                             **({"error": r["error"]} if "error" in r else
                                {k: r[k] for k in ("peak_rss_gib", "peak_rss_anon_gib", "quantize_seconds")})}
                            for s, r in measured]}
        out["guard"].append(guard)
        if len(ok) < 2:
            guard["skipped"] = "the pilot runs failed, so the memory the block needs is unknown"
            continue
        (s1, r1), (s2, r2) = ok[0], ok[-1]
        q = (r2["peak_rss_anon_gib"] - r1["peak_rss_anon_gib"]) * GIB / (s2**2 - s1**2)
        p = r1["peak_rss_anon_gib"] * GIB - q * s1**2
        block = shape_sizes(full_config, entry, n * seqlen)["block_bf16"]
        # the block's weights are shard pages (RssFile) while it is worked on: counted too, they must stay resident
        estimate = p + q + block
        available = meminfo("MemAvailable") or 0
        guard.update(estimated_anon_gib=gib(p + q), estimated_with_block_pages_gib=gib(estimate),
                     available_gib=gib(available), limit_gib=gib(args.memory_fraction * available))
        if estimate > args.memory_fraction * available:
            guard["skipped"] = (f"estimated peak {estimate / GIB:.1f} GiB (allocations {(p + q) / GIB:.1f} + "
                                f"the block's weights {block / GIB:.1f}) exceeds {args.memory_fraction:.0%} of the "
                                f"{available / GIB:.1f} GiB available")
            log(f"llama70b {entry['label']}: skipped: {guard['skipped']}")
            too_big.append((entry["label"], needs))
            continue
        free_disk = shutil.disk_usage(args.work_dir).free
        if folder is None and free_disk < 2.2 * need_disk:
            guard["skipped"] = f"needs {2.2 * need_disk / GIB:.1f} GiB of disk, {free_disk / GIB:.1f} GiB free"
            continue
        if folder is None:
            folder = write_checkpoint(args.work_dir, "llama70b", shape, 1, args.seed)
        record = runner.run(folder, entry, n, seqlen, args.offload)
        if "error" not in record:
            record["estimated_anon_gib"] = guard["estimated_anon_gib"]
            record["shape_bytes"] = shape_sizes(full_config, entry, n * seqlen)
        out["runs"].append(record)
    out["checkpoint"] = None if folder is None else str(folder)
    return out


def section_gpu(args, runner: Runner) -> dict:
    if torch.cuda.is_available():
        return {"device_name": torch.cuda.get_device_name(0), **device_runs(args, runner, "cuda")}
    out = {"skipped": "no CUDA device"}
    if args.quick:  # the same code path on the CPU, so that it is exercised where there is no GPU
        out["cpu_exercise"] = device_runs(args, runner, "cpu", methods=parse_methods(args.methods)[:1])
    return out


def device_runs(args, runner: Runner, device: str, methods: list[dict] | None = None) -> dict:
    """The llama8b checkpoint with the fewest blocks quantized on `device` by each method: blocks per minute and,
    on CUDA, the peak allocated device memory."""
    shape = QUICK_8B if args.quick else LLAMA3_8B
    blocks = min(parse_ints(args.blocks))
    folder = write_checkpoint(args.work_dir, "llama8b", shape, blocks, args.seed)
    runs = []
    for entry in methods or parse_methods(args.methods):
        record = runner.run(folder, entry, args.nsamples, args.seqlen, args.gpu_offload, device)
        if "error" not in record and "blocks_per_minute" not in record:
            record["blocks_per_minute"] = round(60 * record["blocks"] / record["quantize_seconds"], 3)
        runs.append(record)
    return {"device": device, "blocks": blocks, "offload": args.gpu_offload, "runs": runs}


def section_smollm2(args, runner: Runner) -> dict:
    """`boa quantize smollm2-135m` (GPTQ w4 g128) with --nproc 1 and 2, each timed from outside."""
    n, seqlen = parse_sizes(args.smollm2_calib)[0]
    sides = {}
    for nproc in (1, 2):
        runner.tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="smollm2-", dir=runner.tmp_root))
        report = tmp / "report.json"
        command = [sys.executable, "-m", "boa.cli", "quantize", "smollm2-135m", "--method", "gptq", "--bits", "4",
                   "--group-size", "128", "--calib", "wikipedia", "--nsamples", str(n), "--seqlen", str(seqlen),
                   "--device", "cpu", "--corpora", "wikipedia", "--eval-windows", str(args.smollm2_eval_windows),
                   "--eval-seqlen", str(args.smollm2_eval_seqlen), "--nproc", str(nproc), "--json", str(report)]
        env = dict(os.environ)
        if args.threads:  # else one process keeps torch's default and torchrun gives each of two OMP_NUM_THREADS=1
            env["OMP_NUM_THREADS"] = str(args.threads)
        threads = int(env.get("OMP_NUM_THREADS", 1 if nproc > 1 else torch.get_num_threads()))
        log(f"run: boa quantize smollm2-135m, {n}x{seqlen}, --nproc {nproc}")
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            wall = time.perf_counter() - start
            if proc.returncode != 0 or not report.is_file():
                sides[nproc] = {"nproc": nproc, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
                log(f"FAILED --nproc {nproc}: {proc.stderr.strip()[-500:]}")
                continue
            data = json.loads(report.read_text())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        ppl = data["results"][-1].get("ppl_wikipedia")
        sides[nproc] = {"nproc": nproc, "threads_per_process": threads, "wall_seconds": round(wall, 3),
                        "phase_seconds": {k: round(v, 3) for k, v in data.get("seconds", {}).items()},
                        "ppl_wikipedia": ppl, "rank0_peak_memory_mb": data.get("peak_memory_mb"),
                        "command": shlex.join(["boa", *command[3:-2]])}  # less --json and its temporary path
        log(f"  --nproc {nproc}: {wall:.1f} s, ppl {ppl}")
    out = {"model": "smollm2-135m", "method": "gptq-w4g128", "calibration": {"corpus": "wikipedia", "nsamples": n,
                                                                             "seqlen": seqlen},
           "eval": {"corpus": "wikipedia", "windows": args.smollm2_eval_windows, "seqlen": args.smollm2_eval_seqlen},
           "one_process": sides.get(1), "two_processes": sides.get(2),
           "note": SMOLLM2_NOTE.format(cores=os.cpu_count(), threads=args.threads or torch.get_num_threads())}
    one, two = sides.get(1, {}), sides.get(2, {})
    if "wall_seconds" in one and "wall_seconds" in two:
        out["wall_ratio_two_over_one"] = round(two["wall_seconds"] / one["wall_seconds"], 3)
        q1, q2 = one["phase_seconds"].get("quantize"), two["phase_seconds"].get("quantize")
        if q1 and q2:
            out["quantize_ratio_two_over_one"] = round(q2 / q1, 3)
        if one["ppl_wikipedia"] and two["ppl_wikipedia"]:
            out["ppl_relative_difference"] = round(abs(two["ppl_wikipedia"] - one["ppl_wikipedia"])
                                                   / one["ppl_wikipedia"], 5)
    return out


# ---------------------------------------------------------------------------------------------------------------
# output


RUN_COLUMNS = (("method", "label", "{}"), ("blocks", "blocks", "{}"), ("calib", None, "{}"),
               ("offload", "offload", "{}"), ("device", "device", "{}"), ("peak GiB", "peak_rss_gib", "{:.2f}"),
               ("anon GiB", "peak_rss_anon_gib", "{:.2f}"), ("file GiB", "peak_rss_file_gib", "{:.2f}"),
               ("quantize s", "quantize_seconds", "{:.1f}"), ("s/block", "seconds_per_block", "{:.1f}"),
               ("save s", "save_seconds", "{:.1f}"), ("total s", "total_seconds", "{:.1f}"),
               ("out GiB", "output_gib", "{:.3f}"))


def print_runs(title: str, runs: list[dict]) -> None:
    if not runs:
        return
    print(f"\n{title}")
    rows = []
    for r in runs:
        if "error" in r:
            rows.append([r.get("label", "?"), "", f"{r['nsamples']}x{r['seqlen']}", r["offload"], r["device"],
                         "FAILED: " + r["error"].splitlines()[0][:60]])
            continue
        row = []
        for _, key, fmt in RUN_COLUMNS:
            row.append(f"{r['nsamples']}x{r['seqlen']}" if key is None else fmt.format(r[key]))
        rows.append(row)
    header = [c for c, _, _ in RUN_COLUMNS]
    widths = [max(len(header[i]), *(len(row[i]) for row in rows if i < len(row))) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def print_summary(result: dict) -> None:
    sections = result["sections"]
    s = sections.get("llama8b")
    if s and "runs" in s:
        print_runs("llama8b: Llama-3-8B-shaped blocks, streamed", s["runs"])
        for f in s["flatness"]["methods"]:
            print(f"flatness {f['method']}: peak at {f['blocks'][1]} blocks / at {f['blocks'][0]} = "
                  f"{f['peak_ratio']} (anon {f['anon_peak_ratio']})")
        m = s["memory_model"]
        for name, fit in m.get("fits", {}).items():
            if "a_gib" in fit:
                print(f"memory model {m['method']} ({name}): a = {fit['a_gib']} GiB, b = {fit['b_bytes_per_token']} "
                      f"B/token (expected {m['expected_b_bytes_per_token']}), predicted at "
                      f"{m['target']['nsamples']}x{m['target']['seqlen']}: {fit['predicted_gib']} GiB")
        d = m.get("disk", {})
        if "predicted_rss_gib_at_target" in d:
            measured = d.get("measured", {})
            print(f"  --offload disk: measured {measured.get('peak_rss_gib')} GiB at {measured.get('nsamples')}x"
                  f"{measured.get('seqlen')} (predicted {d.get('predicted_rss_gib_at_measured_size')}); predicted at "
                  f"the target: {d['predicted_rss_gib_at_target']} GiB")
    s = sections.get("llama70b")
    if s and "guard" in s:
        print()
        for g in s["guard"]:
            estimate = (f"estimated {g['estimated_with_block_pages_gib']} GiB, {g['available_gib']} available"
                        if "estimated_with_block_pages_gib" in g else "no estimate")
            print(f"llama70b guard {g['method']}: {estimate}" + (f"; skipped: {g['skipped']}" if "skipped" in g else
                                                                 "; runs"))
        print_runs("llama70b: one Llama-2-70B-shaped block", s["runs"])
    s = sections.get("gpu")
    if s:
        if "runs" in s:
            print_runs(f"gpu: {s.get('device_name')}", s["runs"])
        else:
            print(f"\ngpu: skipped ({s.get('skipped')})")
            if "cpu_exercise" in s:
                print_runs("gpu code path exercised on the CPU", s["cpu_exercise"]["runs"])
    s = sections.get("smollm2")
    if s and "one_process" in s:
        print("\nsmollm2: boa quantize smollm2-135m gptq w4g128")
        for side in (s["one_process"], s["two_processes"]):
            if side and "error" not in side:
                print(f"  --nproc {side['nproc']}: wall {side['wall_seconds']:.1f} s, quantize "
                      f"{side['phase_seconds'].get('quantize', float('nan')):.1f} s, ppl {side['ppl_wikipedia']:.3f}")
            elif side:
                print(f"  --nproc {side['nproc']}: FAILED {side['error'][:200]}")
        if "wall_ratio_two_over_one" in s:
            print(f"  wall 2/1 = {s['wall_ratio_two_over_one']}, ppl relative difference "
                  f"{s.get('ppl_relative_difference')}")


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and calibration: the whole script in "
                        "about two minutes (a check that it works, not a measurement)")
    parser.add_argument("--json", type=Path, help="default bench/results/scale.json (scale_quick.json with --quick)")
    parser.add_argument("--merge", action="store_true", help="keep the sections of an existing --json file that "
                        "this run does not measure")
    parser.add_argument("--work-dir", type=Path, help="where the random checkpoints are cached and the runs write "
                        "(default $BOA_CACHE/bench-scale)")
    parser.add_argument("--tmp-dir", type=Path, help="where each run's output and activation files go while it "
                        "runs (default WORK_DIR/runs); removed after each run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads in each run (default: torch's own; --quick 1, "
                        "which tiny shapes do not miss and which keeps them steady on a busy machine)")
    g = parser.add_argument_group("llama8b and gpu")
    g.add_argument("--blocks", help="block counts of the 8B-shaped checkpoints (default 2,4,8; --quick 2,4)")
    g.add_argument("--methods", default="gptq-w4g128,turboboa-w4g128,turboboa-w3",
                   help="METHOD-wBITS[gGROUP], comma-separated (w3: per-channel)")
    g.add_argument("--nsamples", type=int, help="calibration windows (default 16; --quick 8)")
    g.add_argument("--seqlen", type=int, help="tokens a window (default 512; --quick 64)")
    g.add_argument("--offload", default="device", choices=("auto", "device", "cpu", "disk"),
                   help="where the activation caches are kept in the llama8b and llama70b runs")
    g.add_argument("--model-method", help="the memory model's method (default: the first of --methods)")
    g.add_argument("--model-sizes", help="the memory model's calibration sizes (default 8x512,16x512,32x512,8x1024: "
                   "the last one separates the forward batch's share; --quick 4x64,8x64,4x128)")
    g.add_argument("--predict", default="128x2048", help="the calibration size the memory model predicts")
    g.add_argument("--gpu-offload", default="device", choices=("auto", "device", "cpu", "disk"))
    g = parser.add_argument_group("llama70b")
    g.add_argument("--methods-70b", default="gptq-w4g128,turboboa-w4g128")
    g.add_argument("--calib-70b", help="calibration size (default 8x512; --quick 4x64)")
    g.add_argument("--pilot-scales", help="widths of the guard's pilot runs (default 0.125,0.25; --quick 0.25,0.5)")
    g.add_argument("--memory-fraction", type=float, default=0.85,
                   help="run the 70B block only if its estimated peak is below this share of the available memory")
    g = parser.add_argument_group("smollm2")
    g.add_argument("--smollm2-calib", help="calibration size (default 32x512; --quick 4x64)")
    g.add_argument("--smollm2-eval-windows", type=int, help="perplexity windows (default 32; --quick 2)")
    g.add_argument("--smollm2-eval-seqlen", type=int, help="perplexity window length (default 512; --quick 128)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child, args.child_result)

    quick = args.quick
    defaults = {"blocks": ("2,4,8", "2,4"), "nsamples": (16, 8), "seqlen": (512, 64),
                "model_sizes": ("8x512,16x512,32x512,8x1024", "4x64,8x64,4x128"), "threads": (None, 1),
                "calib_70b": ("8x512", "4x64"), "pilot_scales": ("0.125,0.25", "0.25,0.5"),
                "smollm2_calib": ("32x512", "4x64"), "smollm2_eval_windows": (32, 2),
                "smollm2_eval_seqlen": (512, 128)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    here = Path(__file__).resolve().parent
    args.json = args.json or here / "results" / ("scale_quick.json" if quick else "scale.json")
    from boa.core.io import cache_dir

    args.work_dir = (args.work_dir or cache_dir("bench-scale")).resolve()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    parse_methods(args.methods), parse_methods(args.methods_70b), parse_sizes(args.model_sizes)  # fail early

    command = shlex.join([sys.executable, *sys.argv])
    result = {"bench": "scale", "command": command, "quick": quick,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
              "work_dir": str(args.work_dir), "sections": {}, "section_seconds": {}}
    if args.merge and args.json.is_file():
        earlier = json.loads(args.json.read_text())
        for name, section in earlier.get("sections", {}).items():
            if name not in sections:
                result["sections"][name] = section
                result["section_seconds"][name] = earlier.get("section_seconds", {}).get(name)
    runner = Runner(args)
    handlers = {"llama8b": section_llama8b, "llama70b": section_llama70b, "smollm2": section_smollm2,
                "gpu": section_gpu}
    failed = False
    try:
        for name in sections:
            log(f"section {name}")
            start = time.perf_counter()
            try:
                section = handlers[name](args, runner)
            except Exception as err:  # one section's failure leaves the others' results
                failed = True
                section = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
                log(f"section {name} FAILED: {section['error']}")
            section["command"] = command
            result["sections"][name] = section
            result["section_seconds"][name] = round(time.perf_counter() - start, 1)
            write_result(args.json, result)
    finally:
        runner.cleanup()
    failed = failed or any("error" in r for s in result["sections"].values() if isinstance(s, dict)
                           for r in s.get("runs", []))
    print_summary(result)
    print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
