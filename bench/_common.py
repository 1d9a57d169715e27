"""Helpers shared by the bench scripts (demo.py, quality.py, speed.py)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import boa

FP = "fp"
# Set by the run itself (--settings, --nsamples, --seqlen, the method name), so not overridable per method.
RESERVED = ("method", "bits", "group_size", "nsamples", "seqlen")


def parse_settings(text: str) -> list[tuple[int, int]]:
    """"w4g128,w3" -> [(4, 128), (3, -1)]: bits and group size (-1, per-channel, when no g)."""
    settings = []
    for item in text.split(","):
        item = item.strip()
        bits, _, group = item.removeprefix("w").partition("g")
        try:
            settings.append((int(bits), int(group) if group else -1))
        except ValueError:
            raise SystemExit(f"setting {item!r} is not of the form wBITS[gGROUP], e.g. w4g128 or w3") from None
    return settings


def setting_label(bits: int, group_size: int) -> str:
    """(4, 128) -> "w4g128", (3, -1) -> "w3": the inverse of parse_settings."""
    return f"w{bits}" + (f"g{group_size}" if group_size != -1 else "")


@dataclasses.dataclass
class MethodEntry:
    entry: str        # as given, e.g. "turboboa:rows_per_step=4"; the row's "method" in the JSON
    method: str       # "turboboa"
    overrides: dict   # {"rows_per_step": 4}


def parse_value(text: str):
    """"4" -> 4, "0.25" -> 0.25, "true"/"false" -> bool, anything else stays a string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_methods(text: str) -> list[MethodEntry]:
    """"fp,rtn,turboboa:rows_per_step=4" -> entries; override keys are checked against QuantConfig's fields."""
    fields = {f.name for f in dataclasses.fields(boa.QuantConfig)}
    entries = []
    for item in text.split(","):
        item = item.strip()
        method, *pairs = item.split(":")
        overrides = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise SystemExit(f"method entry {item!r}: override {pair!r} is not of the form key=value")
            if key in RESERVED:
                raise SystemExit(f"method entry {item!r}: {key!r} is set by the run (--settings, --nsamples, "
                                 "--seqlen or the method name) and cannot be overridden per method")
            if key not in fields:
                raise SystemExit(f"method entry {item!r}: {key!r} is not a QuantConfig field; known fields: "
                                 f"{', '.join(sorted(fields - set(RESERVED)))}")
            overrides[key] = parse_value(value)
        if method == FP and overrides:
            raise SystemExit(f"method entry {item!r}: fp takes no overrides")
        if item in (e.entry for e in entries):
            raise SystemExit(f"method entry {item!r} is given twice")
        entries.append(MethodEntry(item, method, overrides))
    return entries


def side_venv(folder: Path, requirements: list[str], env: dict | None = None) -> Path:
    """The python of a venv of its own for a peer tool (which pins other versions than boa), created on first use;
    a marker file records what was installed, so a change of requirements rebuilds it."""
    python, marker = folder / "bin" / "python", folder / "installed.txt"
    wanted = " ".join(requirements)
    if not marker.exists() or marker.read_text() != wanted:
        print(f"creating a venv in {folder} (once, minutes): pip install {wanted}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True, env=env)
        marker.write_text(wanted)
    return python
