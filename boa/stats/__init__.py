"""Calibration statistics: input Hessians, dX terms and BoA's attention factors, gathered by running blocks."""
from boa.stats.attention import AttentionRecorder, StopForward, attention_probabilities, back_rotate, capturing
from boa.stats.collect import LayerStats, attention_layer_stats, collect_statistics

__all__ = [
    "AttentionRecorder",
    "LayerStats",
    "StopForward",
    "attention_layer_stats",
    "attention_probabilities",
    "back_rotate",
    "capturing",
    "collect_statistics",
]
