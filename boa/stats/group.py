"""`GroupStatistics`: one sequential group's LayerStats, as a method's `Needs` declare them."""
from __future__ import annotations

import torch

from boa.algorithms import Needs
from boa.core.errors import BoaError
from boa.core.ranks import Ranks
from boa.models.adapter import Adapter
from boa.stats.attention import AttentionRecorder
from boa.stats.reduce import reduce_accumulators, reduce_recorder
from boa.stats.collect import FPPass, LayerStats, attention_layer_stats, collect_statistics


class GroupStatistics:
    """Gathers a group's LayerStats: input Hessians for every layer (plus dX terms when the FP pass is given) and,
    when the method needs the attention, BoA's row factors for the q/k/v group. Statistics in `dtype` (fp32 or
    fp64) whatever the model's dtype; with several ranks, summed over the windows of all of them."""

    def __init__(self, model, adapter: Adapter, needs: Needs, dtype: torch.dtype = torch.float32,
                 ranks: Ranks = Ranks.single()):
        self.model, self.adapter, self.needs, self.dtype, self.ranks = model, adapter, needs, dtype, ranks
        self._rotary = {}  # seqlen -> rotary matrices (or None without RoPE), the same for every block

    def _rotary_matrices(self, block, seqlen):
        if seqlen not in self._rotary:
            attention = dict(block.named_modules())[self.adapter.attention]
            self._rotary[seqlen] = self.adapter.rotary_matrices(self.model, attention, seqlen)
        return self._rotary[seqlen]

    def __call__(self, block, group: list[str], inputs, kwargs, fp: FPPass | None = None) -> dict[str, LayerStats]:
        adapter = self.adapter
        recorder = None
        if self.needs.attention and adapter.v_proj in group:
            recorder = AttentionRecorder(values=True, dtype=self.dtype, stop=group[-1] in adapter.qkv)
        hessians = collect_statistics(block, group, inputs, kwargs, self.dtype, fp=fp, recorder=recorder,
                                      adapter=adapter)
        reduce_accumulators(hessians.values(), self.ranks)
        stats = {name: LayerStats(acc.H, D=acc.D) for name, acc in hessians.items()}
        if recorder is not None:
            shared = hessians[adapter.q_proj]
            if not (hessians[adapter.k_proj] is shared and hessians[adapter.v_proj] is shared):
                raise BoaError("BoA needs q_proj, k_proj and v_proj to read the same input; this model's adapter "
                               "does not fit that (use --method gptq)")
            reduce_recorder(recorder, self.ranks)
            rotary = self._rotary_matrices(block, recorder.seqlen)
            stats.update(attention_layer_stats(adapter, block, shared, recorder.finish(), rotary,
                                               self.needs.v_row_factor))
        return stats
