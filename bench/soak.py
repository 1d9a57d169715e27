"""Kill soak: SIGKILL `boa quantize` at random moments, resume each with --resume, and check every result is
bit-identical to an uninterrupted run (model.safetensors and quantization.json byte for byte).

    python bench/soak.py --kills 50 --json bench/results/soak.json

The run is small but real: the packaged SmolLM2-135M, GPTQ w4 g128 on a few short Wikipedia windows, saved with
--out (so every block is checkpointed in OUT.partial and the save goes through boa's atomic writer). Kill moments are
drawn uniformly over the uninterrupted run's duration (load, calibration, blocks, save), seeded; a run that finishes
before its moment is checked too but does not count as a kill (at most 2 × --kills runs). Not a test: it takes
minutes, and needs a quiet machine for the kill moments to spread over the whole run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = ["smollm2-135m", "--method", "gptq", "--bits", "4", "--group-size", "128", "--nsamples", "8", "--seqlen",
        "64", "--corpora", ""]


def boa_quantize(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "boa.cli", "quantize", *ARGS, "--out", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{err[-3000:]}")


def result_bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("model.safetensors", "quantization.json")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the counts here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="boa-soak-"))
    try:
        start = time.perf_counter()
        finish(boa_quantize(work / "reference"), "the uninterrupted run")
        duration = time.perf_counter() - start
        reference = result_bytes(work / "reference")
        print(f"uninterrupted run: {duration:.1f} s", flush=True)

        trials, k = [], 0
        while sum(t["killed"] for t in trials) < args.kills and k < 2 * args.kills:  # runs that beat their kill
            out = work / f"run{k}"                                                     # moment do not count
            at = rng.uniform(0.2, duration)
            proc = boa_quantize(out)
            try:
                proc.wait(timeout=at)
                killed = False  # finished before the kill moment
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = True
            partial = Path(f"{out}.partial")
            steps = json.loads((partial / "progress.json").read_text())["next_step"] if (
                partial / "progress.json").exists() else 0
            if killed:
                finish(boa_quantize(out, "--resume"), f"resume {k}")
            identical = result_bytes(out) == reference
            leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith((f"run{k}.", f".run{k}.")))
            trials.append({"kill_at_s": round(at, 2), "killed": killed, "blocks_done_at_kill": steps,
                           "identical": identical, "leftovers": leftovers})
            print(f"{k:3d}: kill at {at:5.1f} s ({'killed' if killed else 'had finished'}, {steps} blocks done) -> "
                  f"{'identical' if identical else 'DIFFERENT'}{'; left ' + str(leftovers) if leftovers else ''}",
                  flush=True)
            shutil.rmtree(out, ignore_errors=True)
            k += 1
        killed = [t for t in trials if t["killed"]]
        summary = {"kills": len(killed), "finished_before_kill": len(trials) - len(killed),
                   "identical": sum(t["identical"] for t in trials),
                   "identical_after_kill": sum(t["identical"] for t in killed),
                   "with_leftovers": sum(bool(t["leftovers"]) for t in trials),
                   "uninterrupted_seconds": round(duration, 1), "args": ARGS, "trials": trials}
        print(f"{summary['kills']} kills, {summary['identical_after_kill']} resumed bit-identical; "
              f"{summary['finished_before_kill']} runs finished before their kill moment; "
              f"{summary['with_leftovers']} left files behind")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1) + "\n")
        return 0 if summary["identical"] == len(trials) and not summary["with_leftovers"] else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
