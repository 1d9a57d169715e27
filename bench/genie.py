"""Genie (zero-shot CNN quantization) measured: accuracy of FP, RTN and Genie-M on noise, distilled (Genie-D) and
real calibration images, in one run.

    python bench/train_fmnist.py                      # once: the Fashion-MNIST ResNet (cached)
    python bench/genie.py --json bench/results/genie.json [--models fmnist-resnet,efficientnet-lite0]

Fashion-MNIST ResNet, at each of --fmnist-settings: test accuracy (10k images) of FP; RTN (2.4-norm grids, round to
nearest, activation steps from the real images); Genie-M on Gaussian noise, on Genie-D images (zero-shot) and on
real training images (few-shot). The distilled images are made once and shared by the settings; the zero-shot row's
seconds include distillation.
EfficientNet-Lite0 (ImageNet weights), at --lite0-settings: top-1 agreement with the FP model and mean
KL(p_fp ‖ p_q) on the photographs bundled with scikit-image / matplotlib / scikit-learn (ten views each),
zero-shot Genie-M vs RTN, both calibrated on the same Genie-D images (no ImageNet data is packaged).
Iteration counts are smaller than the paper's (4000 distillation steps per batch, 20k reconstruction steps per
block) so that a run fits a CPU; the JSON records every setting used.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import boa
from boa.core.io import write_json
from boa.vision import (DistillConfig, ReconstructConfig, calibration_images, classifier_metrics, evaluation_images,
                        logits_of)


def parse_settings(text: str) -> list[tuple[int, int]]:
    """"w4a4,w2a4" -> [(4, 4), (2, 4)]."""
    out = []
    for item in filter(None, text.split(",")):
        w, a = item.lower().removeprefix("w").split("a")
        out.append((int(w), int(a)))
    return out


def row(model_name, method, data, w_bits, a_bits, logits, labels, reference, seconds) -> dict:
    metrics = classifier_metrics(logits, labels, reference)
    return {"model": model_name, "method": method, "data": data, "w_bits": w_bits, "a_bits": a_bits,
            **metrics, "seconds": round(seconds, 1)}


def print_row(r: dict) -> None:
    def fmt(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    print(" | ".join(fmt(r[k]) for k in ("model", "method", "data", "w_bits", "a_bits", "top1", "agreement", "kl",
                                          "seconds")), flush=True)


# Per model: its option prefix and calibration sources (no ImageNet training images are packaged for Lite0).
MODELS = {"fmnist-resnet": ("fmnist", ("noise", "genie", "real")), "efficientnet-lite0": ("lite0", ("genie",))}


def bench_model(name: str, args, results: list) -> dict:
    prefix, calib_sources = MODELS[name]
    budget = {k: getattr(args, f"{prefix}_{k}") for k in ("settings", "images", "distill_iters", "iters", "batch")}
    n = budget["images"]
    model, spec = boa.load_vision_model(name)
    images, labels = evaluation_images(spec)
    if args.eval_images:
        images, labels = images[: args.eval_images], None if labels is None else labels[: args.eval_images]
    distill_config = DistillConfig(batch_size=min(n, args.distill_batch), iters=budget["distill_iters"])
    reference = logits_of(model, images)
    results.append(row(name, "fp", "none", 32, 32, reference, labels, None, 0.0))
    print_row(results[-1])

    data, data_seconds = {}, {}
    for source in calib_sources:
        start = time.perf_counter()
        config = boa.VisionQuantConfig(data=source, n_images=n, distill=distill_config)
        data[source] = calibration_images(model, spec, config)
        data_seconds[source] = time.perf_counter() - start

    rtn_source = "real" if "real" in data else "genie"
    settings = parse_settings(budget["settings"])
    for w_bits, a_bits in settings:
        runs = [("rtn", rtn_source)] + [("genie-m", source) for source in calib_sources]
        for method, source in runs:
            config = boa.VisionQuantConfig(method=method, data=source, n_images=n, w_bits=w_bits, a_bits=a_bits,
                                           reconstruct=ReconstructConfig(iters=budget["iters"],
                                                                         batch_size=budget["batch"]))
            result = boa.quantize_vision(model, spec, config, images=data[source])
            seconds = result.seconds["quantize"] + (data_seconds[source] if source == "genie" else 0.0)
            results.append(row(name, method, source, w_bits, a_bits, logits_of(result.model, images), labels,
                               reference, seconds))
            print_row(results[-1])
    return {"calibration_images": n, "distill": {**distill_config.__dict__, "n_images": n},
            "reconstruct_iters": budget["iters"], "reconstruct_batch": budget["batch"],
            "data_seconds": data_seconds, "eval_images": len(images), "settings": settings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fmnist-resnet,efficientnet-lite0")
    parser.add_argument("--fmnist-settings", default="w4a4,w2a4")
    parser.add_argument("--fmnist-images", type=int, default=1024)
    parser.add_argument("--fmnist-distill-iters", type=int, default=200, help="Genie-D steps per batch")
    parser.add_argument("--fmnist-iters", type=int, default=2000, help="Genie-M steps per block")
    parser.add_argument("--fmnist-batch", type=int, default=32, help="Genie-M batch")
    parser.add_argument("--lite0-settings", default="w4a8")
    parser.add_argument("--lite0-images", type=int, default=32)
    parser.add_argument("--lite0-distill-iters", type=int, default=50)
    parser.add_argument("--lite0-iters", type=int, default=100)
    parser.add_argument("--lite0-batch", type=int, default=16)
    parser.add_argument("--distill-batch", type=int, default=128)
    parser.add_argument("--eval-images", type=int, default=0, help="0: the whole evaluation set")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results, setup = [], {}
    start = time.perf_counter()
    print("model | method | data | w_bits | a_bits | top1 | agreement | kl | seconds")
    for name in filter(None, args.models.split(",")):
        setup[name] = bench_model(name, args, results)
        write_json(args.json, {"results": results, "setup": setup})
    write_json(args.json, {"results": results, "setup": setup, "seconds": round(time.perf_counter() - start, 1),
                           "threads": torch.get_num_threads(), "machine": platform.machine(),
                           "torch": torch.__version__})


if __name__ == "__main__":
    main()
