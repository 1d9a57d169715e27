"""Input checks every path shares."""
from __future__ import annotations

import torch

from boa.core.errors import BoaError


def check_finite(model: torch.nn.Module) -> None:
    """Every float weight and buffer (e.g. BatchNorm statistics) is finite, else a BoaError naming it."""
    parameters = {name for name, _ in model.named_parameters()}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            kind = "weight" if name in parameters else "buffer"
            raise BoaError(
                f"{kind} {name} holds NaN/Inf; quantizing it would spread the damage. Repair or re-export the model"
            )
