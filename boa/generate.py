"""Text generation from a (packed) model with the KV cache, token by token, streaming: `boa generate`; on boa's own
decode loop (boa.decode) where it runs the model, else on the model's transformers forward.

Prefill runs the prompt once (the packed layers take the BLAS path for its many rows); each new token then runs the
model on one position against the cache (the packed layers take the GEMV path). tok/s counts decode steps only.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from boa.core.errors import BoaError


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    cache_bytes: int  # what the KV cache held at the end

    @property
    def tok_s(self) -> float:
        """Decode tokens per second (the first new token comes from the prefill and is not counted)."""
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest prefix holding top_p of the mass
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """BoaError for settings that cannot generate: max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise BoaError(f"max_new_tokens={max_new_tokens!r} must be at least 1 (the number of tokens to generate)")
    if not temperature >= 0 or temperature == float("inf"):
        raise BoaError(f"temperature={temperature!r} must be a number >= 0 (0: greedy; 1: the model's distribution)")
    if not 0 < top_p <= 1:
        raise BoaError(f"top_p={top_p!r} must be in (0, 1] (1: no nucleus cut; 0.9: the smallest set of tokens "
                       "holding 90% of the probability)")


ENGINES = ("auto", "boa", "transformers")


@torch.inference_mode()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop_at_eos: bool = True, stream=None, engine: str = "auto",
             head_bits: int | None = None) -> GenerationResult:
    """Greedy (temperature 0) or sampled continuation of `prompt`; `stream(text_piece)` gets the text as it grows.
    engine: "boa" (boa.decode's loop), "transformers" (the model's own forward with a KV cache) or "auto" (boa's
    where it runs the model). head_bits: boa's loop runs the output head packed at that many bits (boa.decode.Decoder;
    faster, logits no longer exactly the model's)."""
    from boa import decode

    check_sampling(max_new_tokens, temperature, top_p)
    if engine not in ENGINES:
        raise BoaError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise BoaError(f"the prompt {prompt!r} has no tokens; give some text to continue")
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    if engine == "boa" or (engine == "auto" and decode.supports(model)):
        decoder = decode.Decoder(model, ids.shape[1] + max_new_tokens, head_bits=head_bits)
        forward, cache_object = lambda x: decoder.step(x), decoder
    elif head_bits is not None:
        raise BoaError("head_bits packs the head inside boa's decode loop, which does not run this model (or engine="
                       "'transformers' was asked for); leave head_bits out")
    else:
        accepted = inspect.signature(model.forward).parameters
        keep_last = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
        # The cache object is filled in place; newer transformers call the argument `cache` (past_key_values is
        # deprecated). A quantized KV cache (boa.transforms.KVQuant) is stored at its bits.
        kv = next((t for t in getattr(model, "boa_transforms", ()) if hasattr(t, "new_cache")), None)
        cache_object = kv.new_cache() if kv is not None else DynamicCache()
        cache = {"cache" if "cache" in accepted else "past_key_values": cache_object}

        def forward(x):
            return model(input_ids=x, use_cache=True, **cache, **keep_last).logits[0, -1]
    eos = tokenizer.eos_token_id
    tokens: list[int] = []
    shown = ""

    def emit(token: int) -> None:
        nonlocal shown
        tokens.append(token)
        if stream is not None:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            stream(text[len(shown):])
            shown = text

    start = _clock(device)
    emit(_next_token(forward(ids), temperature, top_p, generator))
    prefill_end = _clock(device)
    while len(tokens) < max_new_tokens and not (stop_at_eos and tokens[-1] == eos):
        emit(_next_token(forward(torch.tensor([[tokens[-1]]], device=device)), temperature, top_p, generator))
    end = _clock(device)
    return GenerationResult(tokens, tokenizer.decode(tokens, skip_special_tokens=True), ids.shape[1],
                            prefill_end - start, end - prefill_end, cache_bytes(cache_object))


def cache_bytes(cache) -> int:
    """Bytes a transformers Cache holds (a boa QuantizedKVCache counts its codes and grids)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)
