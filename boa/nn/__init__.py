from boa.nn.quant_linear import QuantLinear, check_not_quantized, pack_model

__all__ = ["QuantLinear", "check_not_quantized", "pack_model"]
