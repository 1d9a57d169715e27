"""Helpers shared by the bench scripts (demo.py, quality.py, speed.py)."""
from __future__ import annotations

import dataclasses
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import boa

FP = "fp"
# The strongest GPTQ a GPTQModel user can configure (issue 23's honest baseline): act-order and the H-weighted grid,
# with static groups when the setting is grouped (the dynamic act-order groups cannot be exported in column blocks)
STRONG_GPTQ = "gptq-strong"
STRONG_GPTQ_FIELDS = {"act_order": True, "grid": "hessian"}
# Set by the run itself (--settings, --nsamples, --seqlen, the method name), so not overridable per method.
RESERVED = ("method", "bits", "group_size", "nsamples", "seqlen")
# Run settings an entry may set beside its method's fields (boa.QuantConfig's other fields; its transforms come from
# the setting's a/kv bits and the entry's `rotate`).
RUN_OPTIONS = tuple(f.name for f in dataclasses.fields(boa.QuantConfig)
                    if f.name not in ("method", "transforms", "widths"))
ROTATE = "rotate"  # an entry's `rotate=true`: QuaRot (seed 0) before the method
A_CALIBRATE = "a_calibrate"  # `a_calibrate=false`: statistics from float activations (ActivationQuant.calibrate)
TARGET_BITS = "target_bits"  # `target_bits=3.0`: mixed precision (boa.pipeline.mixed) around the setting's width
ENTRY_OPTIONS = (ROTATE, A_CALIBRATE, TARGET_BITS)


@dataclasses.dataclass(frozen=True)
class Setting:
    """What is quantized to how many bits: weights (bits, one grid per group_size columns, -1 per channel), the
    linears' input activations (a_bits, 16: not quantized) and the KV cache (kv_bits)."""

    bits: int
    group_size: int = -1
    a_bits: int = 16
    kv_bits: int = 16

    @property
    def label(self) -> str:
        return setting_label(self.bits, self.group_size, self.a_bits, self.kv_bits)

    @classmethod
    def of_row(cls, row: dict) -> "Setting":
        return cls(row["bits"], row["group_size"], row.get("a_bits", 16), row.get("kv_bits", 16))

    def transforms(self, rotate: bool, a_calibrate: bool = True) -> tuple:
        from boa.transforms import ActivationQuant, KVQuant, QuaRot

        activations = (ActivationQuant(self.a_bits, calibrate=a_calibrate),) if self.a_bits < 16 else ()
        return ((QuaRot(),) if rotate else ()) + activations + ((KVQuant(self.kv_bits),) if self.kv_bits < 16 else ())


_SETTING = re.compile(r"w(\d+)(?:g(\d+))?(?:a(\d+))?(?:kv(\d+))?")


def parse_settings(text: str) -> list[Setting]:
    """"w4g128,w3,w4a4kv4" -> [Setting(4, 128), Setting(3, -1), Setting(4, -1, 4, 4)]."""
    settings = []
    for item in text.split(","):
        item = item.strip()
        match = _SETTING.fullmatch(item)
        if not match:
            raise SystemExit(f"setting {item!r} is not of the form wBITS[gGROUP][aBITS][kvBITS], e.g. w4g128, w3 or "
                             "w4a4kv4")
        bits, group, a_bits, kv_bits = match.groups()
        settings.append(Setting(int(bits), int(group) if group else -1, int(a_bits or 16), int(kv_bits or 16)))
    return settings


def setting_label(bits: int, group_size: int, a_bits: int = 16, kv_bits: int = 16) -> str:
    """(4, 128) -> "w4g128", (3, -1) -> "w3", (4, -1, 4, 4) -> "w4a4kv4": the inverse of parse_settings."""
    return (f"w{bits}" + (f"g{group_size}" if group_size != -1 else "") + (f"a{a_bits}" if a_bits < 16 else "")
            + (f"kv{kv_bits}" if kv_bits < 16 else ""))


@dataclasses.dataclass
class MethodEntry:
    entry: str        # as given, e.g. "turboboa:rows_per_step=4"; the row's "method" in the JSON
    method: str       # "turboboa"
    overrides: dict   # {"rows_per_step": 4}
    static_when_grouped: bool = False  # gptq-strong: static groups at grouped settings

    def config(self, setting: Setting) -> boa.QuantConfig:
        """The run's config at one setting: the method built by boa.algorithms.method_from_dict from its name, the
        setting and the method overrides (aespa's init fields among them), the run options the entry sets, and the
        transforms of the setting's activation / KV bits (after QuaRot with `rotate=true`)."""
        from boa.algorithms import method_from_dict

        fields = {k: v for k, v in self.overrides.items() if k not in (*RUN_OPTIONS, *ENTRY_OPTIONS)}
        if self.static_when_grouped and setting.group_size != -1:
            fields.setdefault("static_groups", True)
        options = {k: v for k, v in self.overrides.items() if k in RUN_OPTIONS}
        try:
            method = method_from_dict({"method": self.method, "bits": setting.bits,
                                       "group_size": setting.group_size, **fields})
            transforms = setting.transforms(bool(self.overrides.get(ROTATE)), self.overrides.get(A_CALIBRATE, True))
            return boa.QuantConfig(method, transforms=transforms, **options)
        except (boa.BoaError, TypeError) as e:
            raise SystemExit(f"method entry {self.entry!r} at {setting.label}: {e}") from None


def planned_config(entry: MethodEntry, config: boa.QuantConfig, model, calib) -> tuple[boa.QuantConfig, dict]:
    """The entry's config with per-layer widths when it sets target_bits (measured on `model`, not cached: the
    entry's seconds include the measurement), and what to add to its row."""
    target = entry.overrides.get(TARGET_BITS)
    if target is None:
        return config, {}
    from boa.pipeline.mixed import mixed_precision

    mixed = mixed_precision(model, calib, config, float(target))
    return mixed.config, {"stored_bits": mixed.bits, "layers_per_width": mixed.summary()}


def excess_ratio(row: dict, reference: dict | None, fp: dict | None, corpus: str) -> float | None:
    """row's perplexity excess over FP divided by the reference row's (e.g. gptq-strong's): < 1 is better."""
    if reference is None or fp is None:
        return None
    base = reference[f"ppl_{corpus}"] - fp[f"ppl_{corpus}"]
    return (row[f"ppl_{corpus}"] - fp[f"ppl_{corpus}"]) / base if base > 0 else None


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


def method_fields(method: str, overrides: dict) -> set[str]:
    """The keys an entry of `method` may override: the method class's fields; for aespa its own and those of its
    init (the entry's init=..., else aespa's default init)."""
    from boa.algorithms import REGISTRY

    cls = REGISTRY[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    if method == "aespa":
        init = overrides.get("init") or cls().init.name
        if init in REGISTRY:
            fields |= {f.name for f in dataclasses.fields(REGISTRY[init])}
    return fields


def parse_methods(text: str) -> list[MethodEntry]:
    """"fp,rtn,gptq-strong,turboboa:rows_per_step=4" -> entries (gptq-strong: STRONG_GPTQ); override keys are
    checked against the method class's fields (aespa: its own and its init's) and the run options
    (boa.QuantConfig's hessian_dtype, cache_dtype, true_sequential)."""
    from boa.algorithms import REGISTRY

    entries = []
    for item in text.split(","):
        item = item.strip()
        method, *pairs = item.split(":")
        strong = method == STRONG_GPTQ
        method = "gptq" if strong else method
        if method != FP and method not in REGISTRY:
            raise SystemExit(f"method entry {item!r}: unknown method {method!r}; known: {FP}, {STRONG_GPTQ}, {', '.join(REGISTRY)}")
        overrides = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise SystemExit(f"method entry {item!r}: override {pair!r} is not of the form key=value")
            if key in RESERVED:
                raise SystemExit(f"method entry {item!r}: {key!r} is set by the run (--settings, --nsamples, "
                                 "--seqlen or the method name) and cannot be overridden per method")
            overrides[key] = parse_value(value)
        if method == FP and overrides:
            raise SystemExit(f"method entry {item!r}: fp takes no overrides")
        if method != FP:
            known = method_fields(method, overrides) | set(RUN_OPTIONS) | set(ENTRY_OPTIONS)
            for key in overrides:
                if key not in known:
                    raise SystemExit(f"method entry {item!r}: {key!r} is not a setting of {method}; known: "
                                     f"{', '.join(sorted(known - set(RESERVED)))}")
        if item in (e.entry for e in entries):
            raise SystemExit(f"method entry {item!r} is given twice")
        entries.append(MethodEntry(item, method, {**STRONG_GPTQ_FIELDS, **overrides} if strong else overrides,
                                   static_when_grouped=strong))
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


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def machine() -> dict:
    """The CPU a figure was measured on (its model name and the vector/matrix extensions boa's kernels use), recorded
    in every bench JSON so that figures from different machines are never compared as if alike."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": name, "cpu_flags": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count()}

