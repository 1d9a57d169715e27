"""boa.load trusts nothing it can check: an edited manifest field, another model's config.json, weights of another
run, a layer whose packed tensors disagree with its bits / group size / width, NaN scales — each is refused with a
BoaError naming the problem, before any forward runs (and so before `boa eval` or an export could use it)."""
import hashlib
import json
import shutil

import pytest
from safetensors.torch import save_file

import boa
from boa.cli import main

from conftest import build_llama, random_windows, read_safetensors

LAYER = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A GPTQ w4 g32 tiny Llama, saved; each test works on its own copy."""
    model = build_llama()
    result = boa.quantize(model, boa.GPTQ(bits=4, group_size=32), random_windows(8, 32), progress=False)
    folder = tmp_path_factory.mktemp("saved") / "q"
    boa.save(result, folder)
    return folder


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "q")


def manifest(folder) -> dict:
    return json.loads((folder / "quantization.json").read_text())


def write_manifest(folder, data: dict, reseal: bool = False) -> None:
    """Writes the manifest; reseal: with a checksum recomputed as boa computes it (a consistent forgery, so that the
    checks behind the checksum are exercised)."""
    if reseal:
        rest = {k: v for k, v in data.items() if k != "manifest_sha256"}
        data = {**data, "manifest_sha256": hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()}
    (folder / "quantization.json").write_text(json.dumps(data))


def test_the_saved_folder_loads(copy):
    model, _, config = boa.load(copy)
    assert config.method == boa.GPTQ(bits=4, group_size=32)


@pytest.mark.parametrize("field, value", [
    ("fingerprint", "0" * 32), ("dtype", "float16"), ("calibration", None), ("version", 1),
    ("config", {"method": "gptq", "bits": 3}), ("layers", {}), ("config_sha256", "0" * 64),
])
def test_every_edited_manifest_field_is_refused(copy, field, value):
    data = manifest(copy)
    write_manifest(copy, {**data, field: value})
    with pytest.raises(boa.BoaError, match="quantization.json was edited after boa wrote it"):
        boa.load(copy)


@pytest.mark.parametrize("edit, message", [
    ({"bits": 3}, r"qweight is \(64, 64\) torch.uint8, but 3-bit codes of 128 inputs in groups of 32 take \(64, 48\)"),
    ({"bits": 7}, "bits=7 is not a packed width"),
    ({"group_size": 16}, r"scales is \(64, 4\) torch.float32, but 4-bit codes of 128 inputs in groups of 16"),
    ({"group_size": 0}, "group_size=0 does not fit 128 inputs"),
    ({"in_features": 64}, "in_features=64 but the layer takes 128 inputs"),
], ids=["bits-3", "bits-7", "group-16", "group-0", "width"])
def test_a_layer_that_disagrees_with_its_tensors_is_refused_naming_it(copy, edit, message):
    data = manifest(copy)
    data["layers"][LAYER] = {**data["layers"][LAYER], **edit}
    write_manifest(copy, data, reseal=True)
    with pytest.raises(boa.BoaError, match=rf"layer {LAYER}: .*{message}"):
        boa.load(copy)


def test_nan_scales_are_refused(copy):
    tensors = read_safetensors(copy)
    tensors[f"{LAYER}.scales"][0, 0] = float("nan")
    fingerprint = manifest(copy)["fingerprint"]
    save_file(tensors, str(copy / "model.safetensors"), metadata={"boa_fingerprint": fingerprint})
    with pytest.raises(boa.BoaError, match=f"layer {LAYER}: its scales hold NaN or Inf"):
        boa.load(copy)


def test_weights_of_another_run_are_refused(copy, tmp_path):
    model = build_llama()
    other = boa.quantize(model, boa.GPTQ(bits=4, group_size=32), random_windows(8, 32, seed=5), progress=False)
    boa.save(other, tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", copy / "model.safetensors")
    with pytest.raises(boa.BoaError, match="comes from another quantization run"):
        boa.load(copy)


def test_another_models_config_json_is_refused(copy):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(boa.BoaError, match="config.json is not the one saved with this model"):
        boa.load(copy)


def test_a_truncated_weights_file_is_refused(copy):
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(boa.BoaError, match="model.safetensors is damaged"):
        boa.load(copy)


def test_cli_eval_and_export_refuse_an_edited_folder_with_exit_2(copy, tmp_path, capsys):
    """`boa eval` used to report `nan` with exit code 0 and `boa export` to write garbage: both now stop first."""
    tensors = read_safetensors(copy)
    tensors[f"{LAYER}.scales"][0, 0] = float("nan")
    save_file(tensors, str(copy / "model.safetensors"), metadata={"boa_fingerprint": manifest(copy)["fingerprint"]})
    assert main(["eval", str(copy), "--corpora", ""]) == 2
    assert main(["export", str(copy), "--format", "gptq", "--out", str(tmp_path / "gptq")]) == 2
    err = capsys.readouterr().err
    assert err.count("boa: error: layer") == 2 and "Traceback" not in err
    assert not (tmp_path / "gptq").exists()
