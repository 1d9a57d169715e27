"""The Hugging Face Hub, when it cannot be reached: one quick connection probe (a second at most) instead of the
Hub clients' ~25 s of retries before the same failure. Where the probe fails, the Hub clients run in their offline
mode for the call (what is in their local cache still loads); where it succeeds, nothing changes."""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
from urllib.parse import urlparse

PROBE_SECONDS = 1.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_requested() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) set by the user."""
    return any(os.environ.get(k, "").upper() in _TRUE
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str, timeout: float) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:  # no DNS, refused, unreachable, timed out
        return False


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the Hub's endpoint (HF_ENDPOINT) opens within `timeout` seconds (asked once per
    process); False in the user's offline mode without asking."""
    if offline_requested():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return _probe(endpoint, timeout)


@contextlib.contextmanager
def offline_unless_reachable():
    """Runs the block in the Hub clients' offline mode (huggingface_hub, and datasets where already imported: import
    it before the block) where the Hub cannot be reached; yields whether it can."""
    reachable = hub_reachable()
    if reachable:
        yield True
        return
    patched = []
    for module_name in ("huggingface_hub.constants", "datasets.config"):  # import datasets before the block
        module = sys.modules.get(module_name)
        if module is None or not hasattr(module, "HF_HUB_OFFLINE"):
            continue
        patched.append((module, module.HF_HUB_OFFLINE))
        module.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        for module, value in patched:
            module.HF_HUB_OFFLINE = value
