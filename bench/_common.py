"""Helpers shared by the bench scripts (demo.py, quality.py)."""
from __future__ import annotations


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
