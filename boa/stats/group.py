"""`GroupStatistics`: one sequential group's LayerStats, as a method's `Needs` declare them."""
from __future__ import annotations

import torch

from boa.algorithms import Needs
from boa.core.errors import BoaError
from boa.core.hessian import HessianAccumulator
from boa.core.ranks import Ranks
from boa.models.adapter import Adapter
from boa.stats.attention import AttentionRecorder
from boa.stats.reduce import reduce_accumulators, reduce_recorder
from boa.stats.collect import FPPass, LayerStats, attention_layer_stats, collect_statistics


# An expert whose layers saw fewer routed tokens than this gets the Hessian pooled over all the experts of its MoE
# block (the token-weighted mean: the statistics of every token routed to any expert) instead of its own, which
# from so few tokens is rank-deficient and noisy (none at all for an expert the calibration never reached).
MIN_EXPERT_TOKENS = 128


def pool_starved_experts(stats: dict, hessians: dict, group: list[str], experts_path: str) -> dict[str, int]:
    """For the expert layers in `group` (experts_path.E.role): each one's routed token count, and in `stats` a
    pooled LayerStats for those under MIN_EXPERT_TOKENS (their own dX term is dropped with their Hessian)."""
    prefix = experts_path + "."
    roles: dict[str, list[str]] = {}
    for name in group:
        if name.startswith(prefix):
            roles.setdefault(name[len(prefix):].split(".", 1)[1], []).append(name)
    tokens = {}
    for names in roles.values():
        seen = {id(hessians[n]): hessians[n] for n in names if n in hessians}.values()
        total = sum(acc.n for acc in seen)
        if total == 0:
            raise BoaError(f"no calibration token reached any of the experts {names[0]} …; give more calibration text")
        pooled = None
        for name in names:
            tokens[name] = hessians[name].n if name in hessians else 0
            if tokens[name] < MIN_EXPERT_TOKENS:
                if pooled is None:
                    pooled = LayerStats(sum(acc.H * (acc.n / total) for acc in seen))
                stats[name] = pooled
    return tokens


def _add_unreached_experts(hessians: dict, block, group: list[str], adapter: Adapter, dtype: torch.dtype) -> None:
    """Empty accumulators (n = 0) for the expert layers in `group` that no token reached on this rank, shared as
    those of a reached expert are (its gate and up read one input), so every rank reduces the same accumulators."""
    prefix, down = adapter.experts_path + ".", adapter.mlp_out.rsplit(".", 1)[1]
    empty: dict[tuple[str, bool], HessianAccumulator] = {}
    for name in group:
        if name.startswith(prefix) and name not in hessians:
            expert, role = name[len(prefix):].split(".", 1)
            layer = block.get_submodule(name)
            key = (expert, role == down)
            if key not in empty:
                empty[key] = HessianAccumulator(layer.in_features, dtype, layer.weight.device)
            hessians[name] = empty[key]


class GroupStatistics:
    """Gathers a group's LayerStats: input Hessians for every layer (plus dX terms when the FP pass is given) and,
    when the method needs the attention, BoA's row factors for the q/k/v group. Statistics in `dtype` (fp32 or
    fp64) whatever the model's dtype; with several ranks, summed over the windows of all of them."""

    def __init__(self, model, adapter: Adapter, needs: Needs, dtype: torch.dtype = torch.float32,
                 ranks: Ranks = Ranks.single()):
        self.model, self.adapter, self.needs, self.dtype, self.ranks = model, adapter, needs, dtype, ranks
        self._rotary = {}  # seqlen -> rotary matrices (or None without RoPE), the same for every block
        self.tokens: dict[str, int] = {}  # expert layers (names inside the block) -> routed tokens; the loop empties it

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
        if adapter.experts_path and self.ranks.distributed:
            _add_unreached_experts(hessians, block, group, adapter, self.dtype)
        reduce_accumulators([hessians[name] for name in group if name in hessians], self.ranks)  # one order on all
        stats = {name: LayerStats(acc.H, D=acc.D) for name, acc in hessians.items()}
        if adapter.experts_path:
            self.tokens.update(pool_starved_experts(stats, hessians, group, adapter.experts_path))
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
