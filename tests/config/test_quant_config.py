"""`boa.QuantConfig`: a run's settings — a typed method and how the pipeline runs it. Its record round-trips, bad
run options raise boa.BoaError, the fingerprint tells runs apart, and the flat records of boa ≤ 0.1 (every method's
knobs side by side, written into manifests) still read into the right typed config."""
import json

import pytest

import boa
from boa.algorithms import REGISTRY, method_from_dict

from conftest import OLD_FLAT_TURBOBOA

OLD_TURBOBOA = {**OLD_FLAT_TURBOBOA, "cache_dtype": "float16"}
OLD_AESPA = {
    **OLD_TURBOBOA, "method": "aespa", "init": "gptq", "bits": 2, "group_size": 32, "rows_per_step": 1,
    "dx_alpha": 0.0, "refine_iters": 0, "v_row_factor": "exact", "rounding_iters": 20, "rounding_lr": 0.05,
    "hessian_dtype": "float64", "cache_dtype": "float32", "true_sequential": False,
}


def test_an_old_flat_turboboa_manifest_reads_into_the_typed_config():
    config = boa.QuantConfig.from_dict(OLD_TURBOBOA)
    assert type(config.method) is boa.TurboBoA
    # the record's own grid and column order, not today's defaults
    assert config.method == boa.TurboBoA(bits=3, group_size=-1, rows_per_step=4, v_row_factor="identity",
                                         grid="hessian", act_order=False, static_groups=False)
    assert (config.method.dx_alpha, config.method.refine_iters, config.method.grid) == (0.25, 1, "hessian")
    assert config == boa.QuantConfig(config.method, cache_dtype="float16")


def test_an_old_flat_aespa_manifest_reads_into_aespa_from_its_init():
    """"init": "gptq" names the init; the init takes the record's grid settings (aespa's H-weighted grid)."""
    config = boa.QuantConfig.from_dict(OLD_AESPA)
    assert type(config.method) is boa.Aespa and type(config.method.init) is boa.GPTQ
    assert config.method == boa.Aespa(init=boa.GPTQ(bits=2, group_size=32, grid="hessian"), rounding_iters=20,
                                      rounding_lr=0.05)
    assert (config.hessian_dtype, config.cache_dtype, config.true_sequential) == ("float64", "float32", False)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_record_round_trips(name):
    method = method_from_dict({"method": name, "bits": 3, "group_size": 32})
    config = boa.QuantConfig(method, hessian_dtype="float64", cache_dtype="bfloat16",
                             true_sequential=False)
    record = config.to_dict()
    assert record == {**config.method.to_dict(), "hessian_dtype": "float64", "cache_dtype": "bfloat16",
                      "true_sequential": False}
    assert boa.QuantConfig.from_dict(json.loads(json.dumps(record))) == config


def test_defaults():
    config = boa.QuantConfig()
    assert config.method == boa.GPTQ()
    assert (config.hessian_dtype, config.cache_dtype, config.true_sequential) == ("float32", "float32", True)


@pytest.mark.parametrize("options, message", [
    (dict(hessian_dtype="float16"), "hessian_dtype='float16': use 'float32' or 'float64'"),
    (dict(cache_dtype="int8"), "cache_dtype='int8': use 'float32', 'float16' or 'bfloat16'"),
    (dict(method="gptq"), "method='gptq' must be a method config"),
])
def test_bad_run_options(options, message):
    with pytest.raises(boa.BoaError, match=message):
        boa.QuantConfig(**options)


def test_validate_rechecks_the_method():
    config = boa.QuantConfig(boa.GPTQ())
    config.method.bits = 5
    with pytest.raises(boa.BoaError, match="bits=5 is not supported"):
        config.validate()


def test_fingerprint_tells_settings_apart():
    base = boa.QuantConfig(boa.GPTQ(bits=4))
    assert base.fingerprint() == boa.QuantConfig(boa.GPTQ(bits=4)).fingerprint()
    others = [boa.QuantConfig(boa.GPTQ(bits=3)), boa.QuantConfig(boa.GPTQ(bits=4, act_order=True)),
              boa.QuantConfig(boa.BoA(bits=4, grid="minmax")), boa.QuantConfig(boa.GPTQ(bits=4), cache_dtype="float16"),
              boa.QuantConfig(boa.GPTQ(bits=4), true_sequential=False)]
    prints = {c.fingerprint() for c in others}
    assert len(prints) == len(others) and base.fingerprint() not in prints
