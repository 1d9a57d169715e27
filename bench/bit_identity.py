"""Digests of the codes every method produces on fixed inputs, to check that a refactor changes no result.

    python bench/bit_identity.py --save bench/results/bit_identity.json   # before the change
    python bench/bit_identity.py --check bench/results/bit_identity.json  # after it: exit 1 on any difference

LLM methods run on the first 2 blocks of the packaged SmolLM2-135M (8 Wikipedia windows of 128 tokens); Genie-M
(and its RTN) on a small BatchNorm CNN with a fixed seed. Each quantized layer's codes, scales, zero points and
group indices are hashed (sha256 of their bytes), with its loss. Runs on 2 threads: BLAS summation order, and so the
last bits, depends on the thread count.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import boa
from boa.config import QuantConfig

LLM_RUNS = {
    "rtn_w4g128": dict(method="rtn", bits=4, group_size=128),
    "gptq_w4g128": dict(method="gptq", bits=4, group_size=128),
    "gptq_w3g64_act_order_static": dict(method="gptq", bits=3, group_size=64, act_order=True, static_groups=True),
    "gptq_w3_hessian_grid": dict(method="gptq", bits=3, group_size=-1, grid="hessian"),
    "boa_w3": dict(method="boa", bits=3, group_size=-1),
    "turboboa_w3": dict(method="turboboa", bits=3, group_size=-1),
    "turboboa_w4g128": dict(method="turboboa", bits=4, group_size=128),
    "aespa_w2g64": dict(method="aespa", bits=2, group_size=64, rounding_iters=20),
}


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:24]


def llm_digests(name: str, settings: dict) -> dict:
    model, tokenizer, _ = boa.load_model("smollm2-135m")
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    calib = boa.data.calibration_windows(tokenizer, "wikipedia", nsamples=8, seqlen=128, seed=0)
    result = boa.quantize(model, QuantConfig.from_dict(settings), calib=calib, progress=False)
    return {layer: {"codes": digest(q.codes), "grid": digest(q.scale, q.zero, q.g_idx), "bits": q.bits,
                    "loss": repr(result.losses[layer])}
            for layer, q in sorted(result.layers.items())}


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.down(x))


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, 3, 16, 16, generator=g), 5, 1, 0)
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True)
    return (x - mean) / var.sqrt()


def cnn_digests(iters: int) -> dict:
    from boa.vision import ReconstructConfig, reconstruct

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        _Block(8, 16, 2), _Block(16, 24, 2),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)),
    )
    model.train()
    with torch.no_grad():
        for seed in range(10):
            model(_images(64, 100 + seed))
    model.eval()
    result = reconstruct(model, _images(64, 1), ReconstructConfig(w_bits=2, a_bits=4, iters=iters, batch_size=16),
                         progress=False)
    out = {name: {"codes": digest(layer.weight.codes),
                  "grid": digest(layer.weight.scale, layer.weight.zero),
                  "input_step": None if layer.input_step is None else digest(layer.input_step)}
           for name, layer in sorted(result.layers.items())}
    out["state_dict"] = digest(*[t for _, t in sorted(result.model.state_dict().items())])
    out["unit_loss"] = repr(result.unit_loss)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", type=Path, help="write the digests here")
    mode.add_argument("--check", type=Path, help="compare with the digests saved here")
    parser.add_argument("--only", help="comma-separated run names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    runs = {**{name: (llm_digests, name, settings) for name, settings in LLM_RUNS.items()},
            "genie_m_w2a4": (lambda n, iters: cnn_digests(iters), "genie_m_w2a4", 40),
            "genie_rtn_w2a4": (lambda n, iters: cnn_digests(iters), "genie_rtn_w2a4", 0)}
    names = args.only.split(",") if args.only else list(runs)
    saved = json.loads(args.check.read_text()) if args.check else {}
    digests, failed = {}, []
    for name in names:
        fn, *fn_args = runs[name]
        digests[name] = fn(*fn_args)
        if args.check:
            same = digests[name] == saved.get(name)
            failed += [] if same else [name]
            print(f"{name}: {'identical' if same else 'DIFFERENT'}", flush=True)
        else:
            print(f"{name}: {len(digests[name])} entries", flush=True)
    if args.save:
        args.save.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    if failed:
        print(f"differ: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
