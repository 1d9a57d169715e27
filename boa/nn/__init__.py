from boa.nn.quant_linear import QuantLinear, pack_model

__all__ = ["QuantLinear", "pack_model"]
