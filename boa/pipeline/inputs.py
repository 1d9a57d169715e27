"""`BlockInputs`: the calibration activations entering the block being quantized, and where they live."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from boa.pipeline.offload import ActivationCache, choose_offload
from boa.stats import StopForward, run_block

FORWARD_BATCH = 8  # calibration windows per block forward


@dataclass
class BlockInputs:
    """Per batch of calibration windows: the hidden states entering the current block on the quantized path
    (`hidden`) and, for the dX correction, on the FP path (`fp`, None without it; it may hold only the first
    batches), with the keyword arguments the model passes each block (`per_block[i]`, one dict per batch: masks,
    positions; `kwargs` is the current block's). They are recorded per block because families differ by layer (Gemma
    3: sliding-window and global layers with their own masks and RoPE); the dicts share the model's tensors, so that
    costs no memory. Activations are kept in `dtype` (the cache dtype), where `capture` placed them (ActivationCache:
    the model's device, host memory or disk)."""

    hidden: ActivationCache
    per_block: list[list[dict]]
    fp: ActivationCache | None
    dtype: torch.dtype
    block: int = 0  # the index of the block the activations enter

    @property
    def kwargs(self) -> list[dict]:
        return self.per_block[self.block]

    @classmethod
    def capture(cls, model, blocks, calib: torch.Tensor, dtype: torch.dtype, with_fp: bool,
                offload: str = "device", offload_dir: str | Path | None = None, fp_windows: int = 0) -> BlockInputs:
        """Runs the model on each batch of windows with `blocks` (all of them, in order) standing in for
        themselves: each records the keyword arguments it is called with and passes its input on uncomputed, the
        first also keeps its input, placed as `offload` says (one of boa.pipeline.OFFLOADS; "auto": where they fit)
        in `offload_dir` for "disk". No block's weights are used, so a streamed model's need not be loaded.
        with_fp: a copy of the inputs starts the FP path, for the batches holding the first `fp_windows` windows
        (0: every batch)."""
        # the embeddings, unlike blocks streamed in later, are where the model computes
        device = model.get_input_embeddings().weight.device
        batches = -(-len(calib) // FORWARD_BATCH)
        fp_batches = (min(batches, -(-fp_windows // FORWARD_BATCH)) if fp_windows else batches) if with_fp else 0
        nbytes = calib.numel() * model.config.hidden_size * dtype.itemsize * (1 + fp_batches / batches)
        # while a block's outputs are written, its inputs are still kept: twice the activations at the peak
        placement = choose_offload(offload, device, int(2 * nbytes))
        hidden = ActivationCache(placement, device, offload_dir, need_bytes=int(2 * nbytes))
        fp = hidden.empty_like() if with_fp else None
        per_block: list[list[dict]] = [[] for _ in blocks]

        def stand_in(index):
            def forward(*args, **kw):
                x = args[0] if args else kw.pop("hidden_states")
                kw = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
                kw["use_cache"] = False
                per_block[index].append(kw)
                if index == 0:
                    kept = x.detach().to(dtype)
                    hidden.append(kept)
                    if fp is not None and len(fp) < fp_batches:
                        fp.append(kept.clone())
                if index == len(blocks) - 1:
                    raise StopForward
                return x  # what the next block gets does not matter: only its keyword arguments are kept

            return forward

        try:
            for index, block in enumerate(blocks):
                block.forward = stand_in(index)  # an instance attribute, shadowing the class's forward
            with torch.no_grad():
                for batch in calib.split(FORWARD_BATCH):
                    try:
                        model(input_ids=batch.to(device), use_cache=False)
                    except StopForward:
                        pass
        finally:
            for block in blocks:
                block.__dict__.pop("forward", None)
        return cls(hidden, per_block, fp, dtype)

    def advance(self, block, fp_outputs) -> None:
        """Moves on to the next block: runs the (now quantized) block on the quantized path, its outputs written
        batch by batch where the inputs are kept; the FP path's next inputs are the FP pass's outputs (a cache, or
        tensors to place like the inputs)."""
        hidden = run_block(block, self.hidden, self.kwargs, self.dtype, out=self.hidden.empty_like())
        self.hidden.close()
        self.hidden = hidden
        self.block += 1
        if self.fp is not None:
            if not isinstance(fp_outputs, ActivationCache):
                fp_outputs = _filled(self.fp.empty_like(), fp_outputs)
            self.fp.close()
            self.fp = fp_outputs

    def state(self) -> dict[str, torch.Tensor]:
        """The activations, for a checkpoint (the kwargs are recomputed by capture)."""
        tensors = {f"batch_{i}": self.hidden.stored(i) for i in range(len(self.hidden))}
        if self.fp is not None:
            tensors.update({f"fp_batch_{i}": self.fp.stored(i) for i in range(len(self.fp))})
        return tensors

    def restore(self, tensors: dict[str, torch.Tensor], block: int) -> None:
        """Replaces the activations with a checkpoint's (state's inverse), placed as before, as the inputs of
        `block`."""
        self.block = block
        batches = range(len(self.hidden))
        hidden = _filled(self.hidden.empty_like(), (tensors[f"batch_{i}"] for i in batches))
        self.hidden.close()
        self.hidden = hidden
        if self.fp is not None:
            fp = _filled(self.fp.empty_like(), (tensors[f"fp_batch_{i}"] for i in range(len(self.fp))))
            self.fp.close()
            self.fp = fp

    def close(self) -> None:
        """Frees the activations (and deletes their files)."""
        self.hidden.close()
        if self.fp is not None:
            self.fp.close()


def _filled(cache: ActivationCache, tensors) -> ActivationCache:
    for x in tensors:
        cache.append(x)
    return cache
