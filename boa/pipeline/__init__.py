"""The pipeline: the block loop (loop.py) over the block inputs (inputs.py; kept where they fit, offload.py), the
statistics each method needs (boa.stats.GroupStatistics) and a checkpoint of finished blocks (boa.core.checkpoint)."""
from boa.pipeline.inputs import BlockInputs
from boa.pipeline.loop import QuantResult, calibration_record, quantize, quantize_block, run_fingerprint
from boa.pipeline.offload import OFFLOADS, ActivationCache, choose_offload

__all__ = ["OFFLOADS", "ActivationCache", "BlockInputs", "QuantResult", "calibration_record", "choose_offload",
           "quantize", "quantize_block", "run_fingerprint"]
