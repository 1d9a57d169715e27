"""The method registry (boa.algorithms): every method is a typed config registered by name that round-trips through
its record, validates its settings (boa.BoaError naming the field), declares the statistics it needs, and reads the
flat records of the CLI and of boa ≤ 0.1; a new method is one registered class."""
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import ClassVar

import pytest

import boa
from boa.algorithms import REGISTRY, GridMethod, Needs, method_from_dict, register, rtn

NAMES = ["rtn", "gptq", "boa", "turboboa", "aespa"]


def test_the_registry_holds_every_method_under_its_name():
    assert list(REGISTRY) == NAMES
    assert [REGISTRY[n] for n in NAMES] == [boa.RTN, boa.GPTQ, boa.BoA, boa.TurboBoA, boa.Aespa]
    assert all(cls.name == name for name, cls in REGISTRY.items())


# Each method with every field off its default, so a round trip that dropped or mixed up a field would show.
CUSTOM = {
    "rtn": boa.RTN(grid="mse", gguf="Q3_K"),  # a GGUF type: 3 bits, blocks of 16, symmetric
    "gptq": boa.GPTQ(grid="hessian", gguf="Q8_0", act_order=True, static_groups=True,
                     block_size=32, percdamp=0.05, damp_reference="median", dx_alpha=0.1, dx_windows=16,
                     refine_iters=2),
    "boa": boa.BoA(grid="mse", gguf="Q3_K", act_order=True, static_groups=True, block_size=64, percdamp=0.02,
                   damp_reference="median", dx_alpha=0.5, dx_windows=8, refine_iters=3, rows_per_step=4,
                   row_order=True, v_row_factor="identity"),
    "turboboa": boa.TurboBoA(grid="minmax", gguf="Q8_0", act_order=False, static_groups=True, block_size=16,
                             percdamp=0.1, damp_reference="median", dx_alpha=0.0, dx_windows=64, refine_iters=0,
                             rows_per_step=2, row_order=True, v_row_factor="identity"),
    "aespa": boa.Aespa(init=boa.GPTQ(bits=3, group_size=32, grid="hessian", act_order=True, dx_alpha=0.2),
                       rounding_iters=20, rounding_lr=0.05, round_weight=0.5, round_weight_qkv=2.0),
}


@pytest.mark.parametrize("name", NAMES)
def test_custom_settings_differ_from_the_defaults_in_every_field(name):
    custom, default = CUSTOM[name], REGISTRY[name]()
    for field in dataclasses.fields(custom):
        assert getattr(custom, field.name) != getattr(default, field.name), field.name


@pytest.mark.parametrize("variant", ["default", "custom"])
@pytest.mark.parametrize("name", NAMES)
def test_every_method_round_trips_through_its_record(name, variant):
    """to_dict names the method; from_dict (the class's and method_from_dict) gives back an equal config, also
    after the record went through JSON (a saved manifest)."""
    method = REGISTRY[name]() if variant == "default" else CUSTOM[name]
    record = method.to_dict()
    assert record["method"] == name
    for data in (record, json.loads(json.dumps(record))):
        assert type(method).from_dict(data) == method
        back = method_from_dict(data)
        assert type(back) is type(method) and back == method
        assert back.to_dict() == record


@pytest.mark.parametrize("init", ["rtn", "gptq", "boa", "turboboa"])
def test_aespa_round_trips_from_every_init(init):
    method = boa.Aespa(init=REGISTRY[init](bits=2, group_size=16, grid="hessian"), rounding_iters=7)
    record = json.loads(json.dumps(method.to_dict()))
    assert record["init"]["method"] == init
    back = method_from_dict(record)
    assert back == method and type(back.init) is REGISTRY[init]
    assert (back.bits, back.group_size, back.spec) == (2, 16, method.init.spec)


def test_defaults_and_labels():
    assert boa.RTN().grid == boa.GPTQ().grid == "minmax"
    assert boa.BoA().grid == boa.TurboBoA().grid == "hessian-fast"
    assert (boa.BoA().rows_per_step, boa.BoA().dx_alpha, boa.BoA().refine_iters) == (1, 0.0, 0)
    assert (boa.TurboBoA().rows_per_step, boa.TurboBoA().dx_alpha, boa.TurboBoA().refine_iters) == (16, 0.25, 1)
    assert (boa.GPTQ().act_order, boa.BoA().act_order, boa.TurboBoA().act_order) == (False, False, True)
    assert (boa.GPTQ().static_groups, boa.TurboBoA().static_groups) == (False, None)
    assert boa.Aespa().init == boa.TurboBoA()
    assert boa.GPTQ().label == "gptq w4g128"
    assert boa.RTN(bits=3, group_size=-1).label == "rtn w3"
    aespa = boa.Aespa(init=boa.TurboBoA(bits=2, group_size=64))
    assert (aespa.bits, aespa.group_size, aespa.label) == (2, 64, "aespa w2g64")


# ---- validation ----

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bits", [5, 1, 0, 16])
def test_unsupported_bits(name, bits):
    """Every method (aespa through its init) refuses bits outside 2, 3, 4, 8."""
    with pytest.raises(boa.BoaError, match=rf"bits={bits} is not supported; choose one of 2, 3, 4, 8"):
        method_from_dict({"method": name, "bits": bits})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("group_size", [0, -2, 1.5, True])
def test_invalid_group_size(name, group_size):
    """0, negative (other than -1), fractional and boolean group sizes are rejected; the message shows the value."""
    with pytest.raises(boa.BoaError, match=re.escape(f"group_size={group_size!r} is invalid")):
        method_from_dict({"method": name, "group_size": group_size})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("group_size", [-1, 1, 128])
def test_valid_group_sizes_are_accepted(name, group_size):
    assert method_from_dict({"method": name, "group_size": group_size}).group_size == group_size


INVALID = [  # (method, field, value, message fragment)
    ("rtn", "grid", "bogus", "grid='bogus' is not supported"),
    ("gptq", "grid", "kmeans", "grid='kmeans' is not supported"),
    ("gptq", "block_size", 0, "block_size=0 must be a positive integer"),
    ("gptq", "block_size", 8.0, "block_size=8.0 must be a positive integer"),
    ("gptq", "percdamp", 1.0, "percdamp=1.0 must be in [0, 1)"),
    ("gptq", "percdamp", -0.1, "percdamp=-0.1 must be in [0, 1)"),
    ("gptq", "dx_alpha", 1.5, "dx_alpha=1.5 must be a number in [0, 1]"),
    ("gptq", "dx_alpha", True, "dx_alpha=True must be a number"),
    ("gptq", "refine_iters", -1, "refine_iters=-1 must be a non-negative integer"),
    ("turboboa", "dx_windows", -8, "dx_windows=-8 must be a non-negative integer"),
    ("turboboa", "dx_windows", 8.0, "dx_windows=8.0 must be a non-negative integer"),
    ("boa", "rows_per_step", 0, "rows_per_step=0 must be a positive integer"),
    ("boa", "v_row_factor", "transpose", "v_row_factor='transpose': use one of exact, identity"),
    ("turboboa", "rows_per_step", -4, "rows_per_step=-4 must be a positive integer"),
    ("turboboa", "dx_alpha", -0.25, "dx_alpha=-0.25 must be a number in [0, 1]"),
    ("aespa", "rounding_iters", 0, "rounding_iters=0 must be a positive integer"),
    ("aespa", "rounding_lr", -0.1, "rounding_lr=-0.1 must be a number at least 0"),
    ("aespa", "round_weight", "big", "round_weight='big' must be a number"),
    ("aespa", "round_weight_qkv", -1, "round_weight_qkv=-1 must be a number at least 0"),
    ("aespa", "init", "aespa", "init='aespa' is not supported; aespa starts from one of rtn, gptq, boa, turboboa"),
]


@pytest.mark.parametrize("name, field, value, message", INVALID, ids=[f"{m}-{f}-{v!r}" for m, f, v, _ in INVALID])
def test_invalid_settings_raise_naming_the_field(name, field, value, message):
    """Built from a record or directly, a bad value raises BoaError whose message names the field and the value."""
    with pytest.raises(boa.BoaError, match=re.escape(message)):
        method_from_dict({"method": name, field: value})
    if field != "init":
        with pytest.raises(boa.BoaError, match=re.escape(message)):
            REGISTRY[name](**{field: value})


def test_aespa_refuses_an_init_it_cannot_start_from():
    with pytest.raises(boa.BoaError, match="init='aespa' is not supported"):
        boa.Aespa(init=boa.Aespa())


def test_unknown_method_names_the_known_ones():
    with pytest.raises(boa.BoaError, match="method='awq' is not supported; choose one of rtn, gptq, boa, turboboa, "
                                          "aespa"):
        method_from_dict({"method": "awq", "bits": 4})
    with pytest.raises(boa.BoaError, match="method=None is not supported"):
        method_from_dict({"bits": 4})


# ---- needs ----

NEEDS = [
    (boa.RTN(), Needs()),
    (boa.RTN(grid="mse"), Needs()),
    (boa.RTN(grid="hessian"), Needs(hessian=True)),
    (boa.GPTQ(), Needs(hessian=True)),
    (boa.GPTQ(dx_alpha=0.25), Needs(hessian=True, dx=True)),
    (boa.BoA(), Needs(hessian=True, attention=True, v_row_factor="exact")),
    (boa.BoA(v_row_factor="identity", dx_alpha=0.1),
     Needs(hessian=True, attention=True, v_row_factor="identity", dx=True)),
    (boa.TurboBoA(), Needs(hessian=True, attention=True, v_row_factor="exact", dx=True)),
    (boa.TurboBoA(dx_alpha=0.0, v_row_factor="identity"),
     Needs(hessian=True, attention=True, v_row_factor="identity")),
    (boa.Aespa(), Needs(hessian=True, attention=True, v_row_factor="exact", dx=True)),
    (boa.Aespa(init=boa.RTN()), Needs(hessian=True, attention=True)),
    (boa.Aespa(init=boa.GPTQ(dx_alpha=0.25)), Needs(hessian=True, attention=True, dx=True)),
    (boa.Aespa(init=boa.BoA(v_row_factor="identity")), Needs(hessian=True, attention=True, v_row_factor="identity")),
]


@pytest.mark.parametrize("method, needs", NEEDS, ids=[f"{i}-{m.name}" for i, (m, _) in enumerate(NEEDS)])
def test_needs_per_method(method, needs):
    """RTN needs statistics only for the H-weighted grid; GPTQ input Hessians (dX with α > 0); BoA/TurboBoA the
    attention's row factors too; aespa always the attention's, with its init's v row factor and dX."""
    assert method.needs() == needs


# ---- flat records ----

FLAT = {  # every method's knobs side by side, as the CLI's flags give them (None: not set)
    "bits": 3, "group_size": -1, "sym": False, "grid": None, "act_order": None, "static_groups": None,
    "percdamp": 0.01, "rows_per_step": None, "dx_alpha": None, "refine_iters": None, "v_row_factor": "exact",
    "row_order": False, "init": None, "rounding_iters": 500, "rounding_lr": 0.1,
}


@pytest.mark.parametrize("name, expected", [
    ("rtn", boa.RTN(bits=3, group_size=-1)),
    ("gptq", boa.GPTQ(bits=3, group_size=-1)),
    ("boa", boa.BoA(bits=3, group_size=-1)),
    ("turboboa", boa.TurboBoA(bits=3, group_size=-1)),
    ("aespa", boa.Aespa(init=boa.TurboBoA(bits=3, group_size=-1))),
])
def test_a_flat_record_reads_into_each_method_with_its_defaults(name, expected):
    """None means the method's default; keys a method does not have are ignored."""
    assert method_from_dict({"method": name, **FLAT, "nsamples": 128, "seed": 0}) == expected


def test_a_flat_aespa_record_builds_its_init_from_the_shared_fields():
    """"init" as a name: the init takes the record's grid fields, with the H-weighted grid unless one is given."""
    flat = {**FLAT, "method": "aespa", "init": "gptq", "act_order": True, "rounding_iters": 20}
    assert method_from_dict(flat) == boa.Aespa(init=boa.GPTQ(bits=3, group_size=-1, grid="hessian-fast",
                                                             act_order=True), rounding_iters=20)
    assert method_from_dict({**flat, "grid": "mse"}).init.grid == "mse"
    assert method_from_dict({**flat, "init": None}).init == boa.TurboBoA(bits=3, group_size=-1, act_order=True)
    with pytest.raises(boa.BoaError, match="init='awq' is not supported"):
        method_from_dict({**flat, "init": "awq"})


# ---- a new method ----

def test_a_registered_method_runs_through_the_pipeline(monkeypatch, tiny_llama):
    """Adding a method is one class with @register: method_from_dict and QuantConfig records find it by name, and
    boa.quantize runs it like any other."""

    @dataclass
    class Truncate(GridMethod):
        name: ClassVar[str] = "truncate"

        def needs(self):
            return Needs()

        def solve(self, W, stats, *, qkv=False, progress=None):
            return rtn(W, self.spec)

    monkeypatch.setitem(REGISTRY, "truncate", None)  # removed again after the test
    assert register(Truncate) is Truncate and REGISTRY["truncate"] is Truncate
    method = method_from_dict({"method": "truncate", "bits": 3})
    assert method == Truncate(bits=3) and method.label == "truncate w3g128"
    config = boa.QuantConfig(method)
    assert boa.QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    result = boa.quantize(tiny_llama, method, progress=False)
    assert len(result.layers) == 14 and all(q.bits == 3 for q in result.layers.values())
