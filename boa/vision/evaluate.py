"""Classifier quality: top-1 accuracy on labelled images, and, against the float model, top-1 agreement and the
mean KL divergence KL(p_float ‖ p_quantized) — what an unlabelled set of real photographs can still measure."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def classifier_metrics(logits: torch.Tensor, labels: torch.Tensor | None = None,
                       reference: torch.Tensor | None = None) -> dict[str, float | None]:
    """{"top1", "agreement", "kl"} in percent / nats; None where labels or reference logits are not given."""
    top1 = agreement = kl = None
    if labels is not None:
        top1 = 100 * (logits.argmax(1) == labels).double().mean().item()
    if reference is not None:
        agreement = 100 * (logits.argmax(1) == reference.argmax(1)).double().mean().item()
        kl = F.kl_div(F.log_softmax(logits.double(), 1), F.log_softmax(reference.double(), 1), log_target=True,
                      reduction="batchmean").item()
    return {"top1": top1, "agreement": agreement, "kl": kl}
