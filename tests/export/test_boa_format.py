"""boa.save / boa.load: a quantized model survives the round trip bit for bit, without pickle, and never overwrites
a folder that holds another model."""
import copy
import json
import os
import re

import pytest
import torch
from safetensors import safe_open

import boa
from boa.core.packed import unpack_codes
from boa.nn import QuantLinear

from conftest import OLD_FLAT_TURBOBOA

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@torch.no_grad()
def logits(model, windows):
    return model(input_ids=windows, use_cache=False).logits


CONFIGS = {
    "per-channel": dict(bits=4, group_size=-1),
    "g16-act-order": dict(bits=3, group_size=16, act_order=True),
    "g24-act-order-static": dict(bits=4, group_size=24, act_order=True, static_groups=True, sym=True),
}


@pytest.mark.parametrize("settings", CONFIGS.values(), ids=CONFIGS.keys())
def test_save_load_round_trip_is_exact(tiny_model, calib, heldout, tmp_path, settings, monkeypatch):
    """The loaded model (packed QuantLinear layers) holds exactly the quantized codes, grids and g_idx, for
    per-channel grids and for group-wise grids under act-order (whose g_idx is a permutation, not a range); on the
    torch path (dequantize, then matmul) its logits equal the in-memory fake-quant model's bit for bit, and on the
    packed kernels within float32 rounding of the different summation order."""
    method = boa.GPTQ(**settings)
    result = boa.quantize(tiny_model, method, calib, progress=False)
    if settings.get("act_order") and not settings.get("static_groups"):
        assert any(not torch.equal(q.g_idx, q.g_idx.sort().values) for q in result.layers.values())
    out = boa.save(result, tmp_path / "out")

    loaded, tokenizer, loaded_config = boa.load(out)
    assert tokenizer is None
    assert loaded_config == result.config == boa.QuantConfig(method)
    assert not loaded.training
    expected = logits(tiny_model, heldout)
    torch.testing.assert_close(logits(loaded, heldout), expected, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("BOA_KERNELS", "torch")
    assert torch.equal(logits(loaded, heldout), expected)

    quant_modules = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert set(quant_modules) == set(result.layers)
    for name, module in quant_modules.items():
        q, got = result.layers[name], module.quantized_weight()
        assert module.bits == method.bits and module.qweight.dtype == torch.uint8
        for field in ("codes", "scale", "zero", "g_idx"):
            assert torch.equal(getattr(got, field), getattr(q, field)), (name, field)
    assert not any(type(m) is torch.nn.Linear for n, m in loaded.named_modules() if n in result.layers)


def test_saved_folder_holds_packed_codes_and_no_pickle(tiny_opt, calib, tmp_path, word_tokenizer):
    """Tensors go through safetensors only: codes packed at 4 bits a weight (uint8, boa/core/packed.py), no
    full-precision weight for a quantized layer, the biases kept, tied head stored once; no pickle-based file
    anywhere; tokenizer round-trips."""
    result = boa.quantize(tiny_opt, boa.GPTQ(bits=4, group_size=32), calib, progress=False)
    out = boa.save(result, tmp_path / "out", word_tokenizer)

    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    assert {"config.json", "model.safetensors", "quantization.json"} <= {p.name for p in files}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name, q in result.layers.items():
            qweight = f.get_tensor(f"{name}.qweight")
            rows, cols = q.codes.shape
            assert qweight.dtype == torch.uint8 and qweight.shape == (rows, -(-cols // 64) * 64 * 4 // 8)
            assert torch.equal(unpack_codes(qweight, 4)[:, :cols], q.codes)
            assert f.get_tensor(f"{name}.scales").dtype == torch.float32
            assert f"{name}.perm" not in keys  # groups are runs of columns without act-order
            assert f"{name}.weight" not in keys
            assert f"{name}.bias" in keys  # OPT's projections have biases
    assert "lm_head.weight" not in keys and "model.decoder.embed_tokens.weight" in keys

    _, tokenizer, _ = boa.load(out)
    text = "w1 w7 w200 nonsense"
    assert tokenizer(text).input_ids == word_tokenizer(text).input_ids == [3, 9, 202, 0]


def test_save_refuses_a_folder_holding_another_model(tiny_llama, tiny_opt, calib, tmp_path, folder_snapshot):
    """A folder holding a different boa model, or any other files, is not overwritten: BoaError names the folder,
    and every file in it is byte-for-byte unchanged."""
    other = boa.quantize(tiny_opt, boa.RTN(bits=4), progress=False)
    occupied = boa.save(other, tmp_path / "occupied")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a model")
    before = {folder: folder_snapshot(folder) for folder in (occupied, plain)}

    result = boa.quantize(tiny_llama, boa.GPTQ(bits=4), calib, progress=False)
    messages = {occupied: "already holds a different model",
                plain: "is not empty and was not written by `boa quantize`"}
    for folder in (occupied, plain):
        with pytest.raises(boa.BoaError, match=messages[folder]) as err:
            boa.save(result, folder)
        assert str(folder) in str(err.value)
        assert folder_snapshot(folder) == before[folder]
    assert sorted(os.listdir(tmp_path)) == ["occupied", "plain"]  # no temporary folder left behind


def test_saving_the_same_result_twice(tiny_llama, calib, heldout, tmp_path):
    """Re-saving a result into the folder that already holds it is allowed and leaves one loadable copy."""
    result = boa.quantize(tiny_llama, boa.GPTQ(bits=4, group_size=32), calib, progress=False)
    boa.save(result, tmp_path / "out")
    boa.save(result, tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"]
    loaded, _, _ = boa.load(tmp_path / "out")
    assert torch.equal(logits(loaded, heldout), logits(tiny_llama, heldout))


def test_load_rejects_a_folder_boa_did_not_write(tiny_llama_dir):
    """A plain transformers folder has no quantization.json: BoaError says so instead of loading random weights."""
    with pytest.raises(boa.BoaError, match="not a boa-quantized model"):
        boa.load(tiny_llama_dir)


def test_save_refuses_a_model_differing_only_by_permuted_weights(tiny_llama, calib, tmp_path, folder_snapshot):
    """Two models that differ only by two swapped rows of one weight are different models (different outputs), so
    saving one's result over the other's folder must be refused."""
    twin = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        w = twin.model.layers[0].mlp.down_proj.weight
        w[[0, 1]] = w[[1, 0]].clone()
        assert not torch.equal(twin(calib).logits, tiny_llama(calib).logits)
    config = boa.GPTQ(bits=4, group_size=-1)
    first = boa.save(boa.quantize(tiny_llama, config, calib, progress=False), tmp_path / "out")
    before = folder_snapshot(first)
    with pytest.raises(boa.BoaError, match="different model"):
        boa.save(boa.quantize(twin, config, calib, progress=False), first)
    assert folder_snapshot(first) == before


def test_save_refuses_an_occupied_output_folder(tiny_llama, calib, occupied_out, folder_snapshot):
    before = folder_snapshot(occupied_out)
    result = boa.quantize(tiny_llama, boa.GPTQ(bits=4), calib, progress=False)
    with pytest.raises(boa.BoaError, match=re.escape(f"output folder {occupied_out} already holds a different model")):
        boa.save(result, occupied_out)
    assert folder_snapshot(occupied_out) == before


def test_save_refuses_an_output_path_that_is_a_file(tiny_llama, calib, tmp_path):
    target = tmp_path / "model.txt"
    target.write_text("keep me")
    result = boa.quantize(tiny_llama, boa.RTN(bits=4), progress=False)
    with pytest.raises(boa.BoaError, match=re.escape(str(target))):
        boa.save(result, target)
    assert target.read_text() == "keep me"


def test_the_manifest_records_config_and_calibration(tiny_llama, calib, tmp_path):
    """quantization.json holds QuantConfig.to_dict() and the calibration windows' record (nothing for RTN)."""
    config = boa.QuantConfig(boa.TurboBoA(bits=3, group_size=32, rows_per_step=4), cache_dtype="float16")
    result = boa.quantize(copy.deepcopy(tiny_llama), config, calib, progress=False)
    manifest = json.loads((boa.save(result, tmp_path / "out") / "quantization.json").read_text())
    assert manifest["config"] == config.to_dict()
    assert manifest["calibration"] == result.calibration
    assert (manifest["calibration"]["nsamples"], manifest["calibration"]["seqlen"]) == (8, 32)
    assert manifest["fingerprint"] == result.fingerprint
    rtn = boa.save(boa.quantize(tiny_llama, boa.RTN(bits=4), progress=False), tmp_path / "rtn")
    assert json.loads((rtn / "quantization.json").read_text())["calibration"] is None




@pytest.mark.parametrize("flat, expected", [
    (OLD_FLAT_TURBOBOA, boa.TurboBoA(bits=3, group_size=-1, rows_per_step=4, v_row_factor="identity",
                                     grid="hessian", act_order=False, static_groups=False)),  # the record's own
    ({**OLD_FLAT_TURBOBOA, "method": "aespa", "init": "gptq", "rows_per_step": 1, "dx_alpha": 0.0, "refine_iters": 0,
      "v_row_factor": "exact", "rounding_iters": 20},
     boa.Aespa(init=boa.GPTQ(bits=3, group_size=-1, grid="hessian"), rounding_iters=20)),
], ids=["turboboa", "aespa-from-gptq"])
def test_a_manifest_with_an_old_flat_config_loads_into_the_typed_config(tiny_llama, heldout, tmp_path, flat,
                                                                       expected):
    """A folder whose quantization.json holds the flat config of boa ≤ 0.1 loads, its config read into the typed
    method (aespa's init from the "init" name and the shared grid fields), and the model is unchanged."""
    result = boa.quantize(tiny_llama, boa.RTN(bits=3, group_size=-1), progress=False)
    out = boa.save(result, tmp_path / "old")
    path = out / "quantization.json"
    manifest = json.loads(path.read_text())
    old = {k: v for k, v in manifest.items() if k not in ("manifest_sha256", "config_sha256")}  # not in old files
    path.write_text(json.dumps({**old, "config": flat, "calibration": None}))
    loaded, _, config = boa.load(out)
    assert type(config.method) is type(expected) and config.method == expected
    assert config == boa.QuantConfig(expected)
    torch.testing.assert_close(logits(loaded, heldout), logits(tiny_llama, heldout), rtol=1e-4, atol=1e-4)


def test_out_may_be_an_existing_empty_folder_such_as_a_mount_point(tiny_llama, calib, tmp_path, word_tokenizer):
    """`docker run -v host:/out ... --out /out`: the folder cannot be renamed over, so it is filled in place (same
    inode), the manifest last; the result loads, and a second save of the same run replaces it in place too."""
    out = tmp_path / "out"
    out.mkdir()
    inode = os.stat(out).st_ino
    result = boa.quantize(tiny_llama, boa.GPTQ(bits=4, group_size=32), calib, out=out, progress=False)
    boa.save(result, out, word_tokenizer)
    assert os.stat(out).st_ino == inode
    boa.load(out)
    boa.save(result, out, word_tokenizer)
    assert os.stat(out).st_ino == inode and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_bfloat16_model_saves_16_bit_scales_and_packed_zeros_and_version_2_still_loads(tiny_llama, calib,
                                                                                         heldout, tmp_path):
    """A bfloat16 model's grids are 16-bit floats, so the file holds them in 16 bits and its zero points at b bits
    (format version 3): the layers take codes + 2 bytes a scale + 3 bits a zero point (padded to a tile), and load
    back to the codes and grids quantized. The same folder rewritten as version 2 wrote it (float32 scales, a byte a
    zero point) loads to the same logits."""
    from safetensors.torch import load_file, save_file

    from boa.core.packed import pack
    from boa.export.boa_format import _manifest_digest

    model = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    result = boa.quantize(model, boa.GPTQ(bits=3, group_size=16), calib, progress=False)
    out = boa.save(result, tmp_path / "v3")
    tensors = load_file(str(out / "model.safetensors"))
    loaded = boa.load(out)[0]
    for name, q in result.layers.items():
        rows, cols = q.codes.shape
        assert tensors[f"{name}.scales"].element_size() == 2
        assert tensors[f"{name}.zeros"].shape == (-(-rows * cols // 16 // 64) * 64 * 3 // 8,)
        got = loaded.get_submodule(name).quantized_weight()
        for field in ("codes", "scale", "zero", "g_idx"):
            assert torch.equal(getattr(got, field), getattr(q, field).to(getattr(got, field).dtype)), (name, field)
    expected = logits(loaded, heldout)

    old = {k: v for k, v in tensors.items() if not k.endswith((".scales", ".zeros"))}
    for name, q in result.layers.items():
        packed = pack(q)
        old[f"{name}.scales"], old[f"{name}.zeros"] = packed.scales, packed.zeros
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    save_file(old, str(out / "model.safetensors"), metadata=metadata)
    manifest = json.loads((out / "quantization.json").read_text())
    manifest["version"] = 2
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (out / "quantization.json").write_text(json.dumps(manifest))
    assert torch.equal(logits(boa.load(out)[0], heldout), expected)
