"""`BlockInputs`: the calibration activations entering the block being quantized, and where they live."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from boa.stats import StopForward, run_block

FORWARD_BATCH = 8  # calibration windows per block forward


@dataclass
class BlockInputs:
    """Per batch of calibration windows: the hidden states entering the current block on the quantized path
    (`hidden`) and, for the dX correction, on the FP path (`fp`, None without it), with the keyword arguments the
    model passed its blocks (masks, positions). Activations are kept in `dtype` (the cache dtype) on the model's
    device."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    fp: list[torch.Tensor] | None
    dtype: torch.dtype

    @classmethod
    def capture(cls, model, first_block, calib: torch.Tensor, dtype: torch.dtype, with_fp: bool) -> BlockInputs:
        """Runs the model up to its first block on each batch of windows and keeps what enters it."""
        hidden, kwargs = [], []

        def catch(module, args, kw):
            x = args[0] if args else kw.pop("hidden_states")
            kw = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
            kw["use_cache"] = False
            hidden.append(x.detach().to(dtype))
            kwargs.append(kw)
            raise StopForward

        handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for batch in calib.split(FORWARD_BATCH):
                    try:
                        model(input_ids=batch.to(device), use_cache=False)
                    except StopForward:
                        pass
        finally:
            handle.remove()
        return cls(hidden, kwargs, [x.clone() for x in hidden] if with_fp else None, dtype)

    def advance(self, block, fp_outputs: list[torch.Tensor] | None) -> None:
        """Moves on to the next block: runs the (now quantized) block on the quantized path; the FP path's next
        inputs are the FP pass's outputs."""
        self.hidden = run_block(block, self.hidden, self.kwargs, self.dtype)
        if self.fp is not None:
            self.fp = fp_outputs

    def state(self) -> dict[str, torch.Tensor]:
        """The activations, for a checkpoint (the kwargs are recomputed by capture)."""
        tensors = {f"batch_{i}": x for i, x in enumerate(self.hidden)}
        tensors.update({f"fp_batch_{i}": x for i, x in enumerate(self.fp or [])})
        return tensors

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replaces the activations with a checkpoint's (state's inverse)."""
        device = self.hidden[0].device
        self.hidden = [tensors[f"batch_{i}"].to(device) for i in range(len(self.hidden))]
        if self.fp is not None:
            self.fp = [tensors[f"fp_batch_{i}"].to(device) for i in range(len(self.hidden))]
