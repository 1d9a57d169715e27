"""boa's GPTQ against a real peer GPTQ: llm-compressor's GPTQModifier (via `oneshot`).

Both quantize the same model on the same calibration windows (the same token ids) with the same settings; then
FP, ours and the peer are scored by boa's own perplexity on the same evaluation windows.

    python bench/peer_gptq.py --model smollm2-135m --bits 4 --group-size 64 --json bench/results/peer_w4g64.json

llm-compressor pins its own transformers, so it lives in its own venv ($BOA_CACHE/peer-venv, made on first use)
and runs in a subprocess (bench/_peer_llmcompressor.py) that returns its fake-quantized Linear weights; they are
loaded into a fresh copy of the FP model here. Reported seconds cover quantization only: boa.quantize for ours,
oneshot for the peer (not venv creation, model loading or evaluation).

Matching: llm-compressor always computes group scales from the original weights before the GPTQ pass (ours:
static_groups=True) and, with its default actorder "static", visits columns by decreasing diag(H) while each column
keeps its original group (ours: act_order=True). It collects a whole decoder block's statistics before quantizing
it (ours: true_sequential=False) and leaves lm_head alone (as boa does).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import boa
from boa.core.io import cache_dir

from _common import side_venv

PEER_REQUIREMENTS = ["torch==2.13.0", "llmcompressor==0.14.0.1"]  # torch pinned: the local CPU wheel, not CUDA
PEER_SCRIPT = Path(__file__).with_name("_peer_llmcompressor.py")
CORPORA = ("wikipedia", "austen")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True, help="-1: per output channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grids (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grids")
    p.add_argument("--act-order", choices=["static", "none"], default="static",
                   help="peer actorder; ours uses act_order=(static) with static groups either way")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=32, help="evaluation windows of seqlen tokens per corpus")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides; on a busy 2-core machine more threads than free cores "
                        "slows the column-by-column GPTQ loop by up to 20x")
    p.add_argument("--json", required=True, help="where to write the results")
    return p.parse_args()


def peer_python() -> Path:
    """The peer venv's python, creating the venv on first use."""
    return side_venv(cache_dir("peer-venv"), PEER_REQUIREMENTS)


def ppl(model, eval_sets: dict, args) -> dict:
    return {f"ppl_{c}": boa.eval.perplexity(model, tokens, args.seqlen, max_windows=args.eval_windows)
            for c, tokens in eval_sets.items()}


def run_ours(args, calib, eval_sets) -> dict:
    model, _, adapter = boa.load_model(args.model)
    method = boa.GPTQ(bits=args.bits, group_size=args.group_size, sym=args.sym, act_order=args.act_order == "static",
                      static_groups=True, percdamp=args.percdamp, block_size=args.block_size)
    config = boa.QuantConfig(method, true_sequential=False)
    result = boa.quantize(model, config, calib=calib, adapter=adapter, progress=False)
    return {**ppl(model, eval_sets, args), "seconds": result.seconds,
            "act_order": method.act_order, "static_groups": True, "true_sequential": False}


def run_peer(args, calib, eval_sets) -> dict:
    python = peer_python()
    with tempfile.TemporaryDirectory(prefix="boa-peer-") as tmp:
        tmp = Path(tmp)
        save_file({"input_ids": calib.contiguous()}, str(tmp / "calib.safetensors"))
        cmd = [str(python), str(PEER_SCRIPT), "--model-dir", boa.models.model_folder(args.model),
               "--calib", str(tmp / "calib.safetensors"), "--out-weights", str(tmp / "weights.safetensors"),
               "--out-json", str(tmp / "result.json"), "--bits", str(args.bits),
               "--group-size", str(args.group_size), "--sym" if args.sym else "--no-sym",
               "--actorder", args.act_order, "--percdamp", str(args.percdamp),
               "--block-size", str(args.block_size), "--threads", str(args.threads)]
        print("peer:", " ".join(cmd), flush=True)
        with open(tmp / "peer.log", "w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = (tmp / "peer.log").read_text()[-3000:]
            raise RuntimeError(f"the peer script failed (exit {done.returncode}):\n{tail}")
        peer = json.loads((tmp / "result.json").read_text())
        peer["actorder"] = None if args.act_order == "none" else args.act_order
        if "error" in peer:
            return peer
        model, _, _ = boa.load_model(args.model)
        weights = load_file(str(tmp / "weights.safetensors"))
    unknown = set(weights) - set(model.state_dict())
    if unknown:
        raise RuntimeError(f"peer weights do not belong to this model: {sorted(unknown)[:3]}")
    model.load_state_dict(weights, strict=False)
    return {**peer, **ppl(model, eval_sets, args)}


def print_table(results: dict) -> None:
    print(f"\n{'':6}{'ppl wikipedia':>15}{'ppl austen':>12}{'seconds':>10}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:6}  error: {r['error'][:200]}")
        else:
            print(f"{name:6}{r['ppl_wikipedia']:15.3f}{r['ppl_austen']:12.3f}{r['seconds']:10.1f}")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = boa.load_model(args.model)
    calib = boa.data.calibration_windows(tokenizer, "wikipedia", nsamples=args.nsamples, seqlen=args.seqlen)
    eval_sets = {c: boa.data.eval_tokens(tokenizer, c) for c in CORPORA}
    results = {"fp": {**ppl(model, eval_sets, args), "seconds": 0.0}}
    del model
    results["ours"] = {"name": f"boa {boa.__version__}", **run_ours(args, calib, eval_sets)}
    results["peer"] = run_peer(args, calib, eval_sets)
    results["settings"] = {k: v for k, v in vars(args).items() if k != "json"} | {
        "calibration": "wikipedia", "eval_tokens_per_corpus": args.eval_windows * args.seqlen}
    print_table({k: results[k] for k in ("fp", "ours", "peer")})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
