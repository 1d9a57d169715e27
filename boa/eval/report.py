"""A run's report: perplexities, seconds per phase and peak memory, printed as a table and written as JSON."""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from boa.core.io import write_json


def peak_memory_mb() -> float:
    """Peak resident memory of this process (and, on a GPU, peak allocated device memory added)."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return rss_kb / 1024 + gpu


@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)   # one per evaluated model: {"model": ..., "ppl_*": ...}
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def to_dict(self) -> dict:
        return {"results": self.rows, "seconds": self.seconds, "peak_memory_mb": peak_memory_mb(), **self.info}

    def print(self, file=None) -> None:
        file = file or sys.stdout  # looked up now: a default bound at import would outlive a redirected stdout
        if self.rows:
            columns = list(dict.fromkeys(k for row in self.rows for k in row))
            widths = {c: max(len(c), *(len(_fmt(row.get(c))) for row in self.rows)) for c in columns}
            print("  ".join(c.ljust(widths[c]) for c in columns), file=file)
            for row in self.rows:
                print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns), file=file)
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        print(f"time: {phases}; peak memory {peak_memory_mb():.0f} MiB", file=file)

    def write(self, path) -> None:
        write_json(path, self.to_dict())


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)
