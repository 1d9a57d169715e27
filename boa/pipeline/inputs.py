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
    (`hidden`) and, for the dX correction, on the FP path (`fp`, None without it), with the keyword arguments the
    model passed its blocks (masks, positions). Activations are kept in `dtype` (the cache dtype), where `capture`
    placed them (ActivationCache: the model's device, host memory or disk)."""

    hidden: ActivationCache
    kwargs: list[dict]
    fp: ActivationCache | None
    dtype: torch.dtype

    @classmethod
    def capture(cls, model, first_block, calib: torch.Tensor, dtype: torch.dtype, with_fp: bool,
                offload: str = "device", offload_dir: str | Path | None = None) -> BlockInputs:
        """Runs the model up to its first block on each batch of windows and keeps what enters it, placed as
        `offload` says (one of boa.pipeline.OFFLOADS; "auto": where they fit) in `offload_dir` for "disk"."""
        # the embeddings, unlike blocks streamed in later, are where the model computes
        device = model.get_input_embeddings().weight.device
        nbytes = calib.numel() * model.config.hidden_size * dtype.itemsize * (2 if with_fp else 1)
        # while a block's outputs are written, its inputs are still kept: twice the activations at the peak
        placement = choose_offload(offload, device, 2 * nbytes)
        hidden = ActivationCache(placement, device, offload_dir, need_bytes=2 * nbytes)
        fp = hidden.empty_like() if with_fp else None
        kwargs = []

        def catch(module, args, kw):
            x = args[0] if args else kw.pop("hidden_states")
            kw = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
            kw["use_cache"] = False
            x = x.detach().to(dtype)
            hidden.append(x)
            if fp is not None:
                fp.append(x.clone())
            kwargs.append(kw)
            raise StopForward

        handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in calib.split(FORWARD_BATCH):
                    try:
                        model(input_ids=batch.to(device), use_cache=False)
                    except StopForward:
                        pass
        finally:
            handle.remove()
        return cls(hidden, kwargs, fp, dtype)

    def advance(self, block, fp_outputs) -> None:
        """Moves on to the next block: runs the (now quantized) block on the quantized path, its outputs written
        batch by batch where the inputs are kept; the FP path's next inputs are the FP pass's outputs (a cache, or
        tensors to place like the inputs)."""
        hidden = run_block(block, self.hidden, self.kwargs, self.dtype, out=self.hidden.empty_like())
        self.hidden.close()
        self.hidden = hidden
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

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replaces the activations with a checkpoint's (state's inverse), placed as before."""
        batches = range(len(self.hidden))
        hidden = _filled(self.hidden.empty_like(), (tensors[f"batch_{i}"] for i in batches))
        self.hidden.close()
        self.hidden = hidden
        if self.fp is not None:
            fp = _filled(self.fp.empty_like(), (tensors[f"fp_batch_{i}"] for i in batches))
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
