"""The quantization methods: typed configs that declare the statistics they need and solve one layer (base.py), each
registered by name. RTN (rtn.py); GPTQ, BoA, TurboBoA: one OBS solver (obs.py, solver.py); aespa: learned rounding
from any of them (aespa.py)."""
from boa.algorithms.base import REGISTRY, GridMethod, Method, Needs, method_from_dict, register
from boa.algorithms.rtn import RTN, rtn
from boa.algorithms.obs import GPTQ, BoA, TurboBoA
from boa.algorithms.aespa import Aespa
from boa.algorithms.solver import obs_solve

__all__ = ["REGISTRY", "RTN", "GPTQ", "BoA", "TurboBoA", "Aespa", "GridMethod", "Method", "Needs", "method_from_dict",
           "obs_solve", "register", "rtn"]
