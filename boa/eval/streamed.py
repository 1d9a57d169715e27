"""Perplexity of a model larger than memory (a boa.models.StreamedModel), one block at a time: what enters block 0
is captured with the embeddings loaded, each block is read from the shards, run over every window and dropped, then
the final norm and the output head turn the last block's outputs into next-token NLL.

Weights held at any moment: the modules around the blocks, or one block, or the final norm and head. Activations
kept: windows × seqlen × hidden in the model's dtype, small next to the weights (placed as BlockInputs places
calibration activations: the device, host memory or disk, wherever they fit).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from boa.core.errors import BoaError
from boa.eval.perplexity import eval_windows, next_token_nll
from boa.models.adapter import adapter_for
from boa.models.weights import StreamedModel, loaded
from boa.pipeline.inputs import BlockInputs


@torch.no_grad()
def streamed_perplexity(
    streamed: StreamedModel, tokens: torch.Tensor, seqlen: int = 512, max_windows: int | None = None,
    batch_size: int = 4, progress: bool = False,
) -> float:
    """What boa.eval.perplexity gives for the same model in memory, computed block by block (see the module
    docstring). batch_size: windows per head forward, which bounds the logits (windows × seqlen × vocab floats);
    the blocks run on BlockInputs' batches."""
    model = streamed.model
    head = model.get_output_embeddings()
    if head is None:
        raise BoaError(f"this {model.config.model_type} model has no output head, so no next-token perplexity; "
                       "evaluate a causal language model")
    adapter = adapter_for(model.config)
    windows = eval_windows(model.config, tokens, seqlen, max_windows)
    blocks = adapter.blocks(model)
    final = adapter.after_block_modules(model)

    with loaded(streamed, streamed.outside_blocks(adapter.blocks_path)):
        inputs = BlockInputs.capture(model, blocks, windows, streamed.dtype, with_fp=False, offload="auto")
    try:
        for block in tqdm(blocks, desc="perplexity", unit="block", disable=not progress, leave=False):
            with loaded(streamed, [block]):
                inputs.advance(block, None)
        total, done = 0.0, 0
        with loaded(streamed, [*final, head]):
            for hidden in inputs.hidden:
                for x in hidden.split(batch_size):
                    for module in final:
                        x = module(x)
                    batch = windows[done: done + len(x)].to(streamed.device)
                    total += next_token_nll(head(x), batch)
                    done += len(x)
    finally:
        inputs.close()
    return math.exp(total / windows[:, 1:].numel())
