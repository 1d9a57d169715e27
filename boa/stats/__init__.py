"""Calibration statistics: input Hessians, dX terms and BoA's attention factors, gathered by running blocks."""
from boa.stats.attention import AttentionRecorder, StopForward, attention_probabilities, back_rotate
from boa.stats.collect import FPPass, LayerStats, attention_layer_stats, collect_statistics, run_block, run_fp_block
from boa.stats.group import GroupStatistics

__all__ = [
    "AttentionRecorder",
    "FPPass",
    "GroupStatistics",
    "LayerStats",
    "StopForward",
    "attention_layer_stats",
    "attention_probabilities",
    "back_rotate",
    "collect_statistics",
    "run_block",
    "run_fp_block",
]
