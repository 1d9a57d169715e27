"""Exports to compressed-tensors (loaded back by transformers + the compressed-tensors package) and to the GPTQ
checkpoint format (read back by an unpacker written here, bit by bit, independently of the packer). `boa export`:
tests/cli/test_cli_export.py."""
import functools
import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import boa
from boa.core.quantizer import QuantizedWeight
from boa.export import export_compressed_tensors, export_gptq
from boa.export.common import EXPORT_MANIFEST, pack_int32
from boa.export.gptq_format import gptq_tensors

from conftest import (
    build_gemma3, build_llama, build_mixtral, build_qwen3_moe, logits, random_windows, read_safetensors,
)

compressed_tensors = pytest.importorskip("compressed_tensors")

SETTINGS = {
    "w4g32-sym": dict(bits=4, group_size=32, sym=True),
    "w3g16-asym": dict(bits=3, group_size=16),
    "w2-per-channel-asym": dict(bits=2, group_size=-1),
    "w8-sym": dict(bits=8, group_size=-1, sym=True),
    # act-order with static groups: columns are visited by decreasing diag(H), but group k keeps columns
    # [16k, 16k + 16), so g_idx stays k // 16
    "w4g16-act-order-static": dict(bits=4, group_size=16, act_order=True, static_groups=True),
}
# act-order proper: group k holds the k-th run of 16 columns in the processing order, so g_idx is a permutation
ACT_ORDER = dict(bits=4, group_size=16, act_order=True)


@functools.cache
def quantized(**settings):
    """(fake-quantized tiny Llama, QuantResult), made once per setting: the exporters only read them."""
    model = build_llama()
    result = boa.quantize(model, boa.GPTQ(**settings), random_windows(8, 32, seed=0), progress=False)
    return model, result


def unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Fields [0, count) of each row's little-endian bit stream (int32 words along the last dim), read one bit at a
    time: field j's bit t is stream bit j·bits + t, i.e. bit (p mod 32) of word p // 32."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    fields = torch.zeros(*w.shape[:-1], count, dtype=torch.int64)
    for t in range(bits):
        p = torch.arange(count) * bits + t
        fields |= ((w[..., p // 32] >> (p % 32)) & 1) << t
    return fields


# compressed-tensors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_compressed_tensors_export_loads_with_the_fake_quant_logits(settings, heldout, tmp_path):
    """transformers + compressed-tensors load the export; every quantized Linear gets back exactly boa's dequantized
    weight and the logits equal the fake-quantized model's exactly (tolerance 0): compressed-tensors computes
    ((c − 2^(b−1)) − (z − 2^(b−1))) · s, the same small integer c − z times the same float32 scale as boa, so the
    weights are bit-identical and the loaded model runs the very same float32 matmuls."""
    model, result = quantized(**settings)
    out = export_compressed_tensors(model, result.layers, tmp_path / "ct", config=result.config)

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(loaded, heldout), logits(model, heldout))
    modules = dict(loaded.named_modules())
    for name, q in result.layers.items():
        assert torch.equal(modules[name].weight, q.dequantize()), name

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    ct_config = compressed_tensors.QuantizationConfig.model_validate(config)
    (scheme,) = ct_config.config_groups.values()
    assert scheme.targets == ["Linear"] and ct_config.ignore == ["lm_head"]
    assert scheme.weights.num_bits == settings["bits"]
    assert scheme.weights.symmetric == settings.get("sym", False)
    assert scheme.weights.strategy == ("channel" if settings["group_size"] == -1 else "group")
    assert json.loads((out / EXPORT_MANIFEST).read_text())["config"] == result.config.to_dict()

    tensors, bits = read_safetensors(out), settings["bits"]
    for name, q in result.layers.items():
        rows, cols = q.codes.shape
        groups = q.scale.shape[1]
        assert f"{name}.weight" not in tensors
        packed = tensors[f"{name}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (rows, math.ceil(cols * bits / 32))
        assert torch.equal(unpack_stream(packed, bits, cols), q.codes.long())
        assert tensors[f"{name}.weight_scale"].dtype == torch.float32
        assert torch.equal(tensors[f"{name}.weight_scale"], q.scale)
        assert tensors[f"{name}.weight_shape"].dtype == torch.int64
        assert tensors[f"{name}.weight_shape"].tolist() == [rows, cols]
        if settings.get("sym"):
            assert f"{name}.weight_zero_point" not in tensors
        else:
            zp = tensors[f"{name}.weight_zero_point"]
            assert zp.dtype == torch.int32 and zp.shape == (math.ceil(rows * bits / 32), groups)
            assert torch.equal(unpack_stream(zp.t(), bits, rows).t(), q.zero.long())
    assert tensors["lm_head.weight"].dtype == torch.float32


def test_compressed_tensors_export_of_gemma3_loads_with_the_fake_quant_logits(heldout, tmp_path):
    """Gemma 3 (sliding-window and global layers, q/k norms, tied embeddings): transformers loads the export and
    computes the fake-quantized model's logits exactly."""
    model = build_gemma3()
    result = boa.quantize(model, boa.TurboBoA(bits=4, group_size=16), random_windows(8, 32, seed=0), progress=False)
    out = export_compressed_tensors(model, result.layers, tmp_path / "ct", config=result.config)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded) is type(model) and loaded.config.layer_types == model.config.layer_types
    assert torch.equal(logits(loaded, heldout), logits(model, heldout))


MOE = {"mixtral": build_mixtral, "qwen3_moe": build_qwen3_moe}


@pytest.mark.parametrize("build", MOE.values(), ids=MOE.keys())
def test_compressed_tensors_export_of_an_moe_model_loads_with_every_experts_weights(build, heldout, tmp_path):
    """The experts are written one by one under the family's own checkpoint names (Mixtral: block_sparse_moe,
    w1/w3/w2), which transformers merges into its fused 3-D experts: each expert's slice is exactly boa's
    dequantized weight, the routers are listed as ignored (vLLM's routers are Linears) and the logits agree.
    Asymmetric experts are refused: transformers' expert loader would drop their zero points."""
    model = build()
    asymmetric = boa.quantize(build(), boa.RTN(bits=4, group_size=16), random_windows(2, 16), progress=False)
    with pytest.raises(boa.BoaError, match="--sym"):  # transformers' expert loader drops zero points
        export_compressed_tensors(model, asymmetric.layers, tmp_path / "asymmetric")
    result = boa.quantize(model, boa.GPTQ(bits=4, group_size=16, sym=True), random_windows(8, 32, seed=0),
                          progress=False)
    out = export_compressed_tensors(model, result.layers, tmp_path / "ct", config=result.config)
    adapter = boa.models.adapter_for(model.config)
    names = set(read_safetensors(out))
    assert {f"{adapter.checkpoint_name(n)}.weight_packed" for n in result.layers} <= names
    if model.config.model_type == "mixtral":
        assert "model.layers.1.block_sparse_moe.experts.3.w3.weight_packed" in names
        assert "model.layers.1.block_sparse_moe.gate.weight" in names
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == sorted(["lm_head", *(adapter.checkpoint_name(f"model.layers.{i}.mlp.gate") for i in range(2))])

    loaded = AutoModelForCausalLM.from_pretrained(out)
    for i, block in enumerate(loaded.model.layers):
        gate_up, down = block.mlp.experts.gate_up_proj, block.mlp.experts.down_proj
        inter = gate_up.shape[1] // 2
        for e in range(adapter.n_experts):
            prefix = f"model.layers.{i}.mlp.experts.{e}"
            assert torch.equal(gate_up[e, :inter], result.layers[f"{prefix}.gate_proj"].dequantize())
            assert torch.equal(gate_up[e, inter:], result.layers[f"{prefix}.up_proj"].dequantize())
            assert torch.equal(down[e], result.layers[f"{prefix}.down_proj"].dequantize())
    torch.testing.assert_close(logits(loaded, heldout), logits(model, heldout), rtol=1e-5, atol=1e-5)


def test_gptq_export_of_mixtral_uses_its_checkpoint_names(tmp_path):
    model = build_mixtral()
    result = boa.quantize(model, boa.RTN(bits=4, group_size=16), random_windows(4, 16, seed=0), progress=False)
    names = set(read_safetensors(export_gptq(model, result.layers, tmp_path / "gptq")))
    assert {"model.layers.0.block_sparse_moe.experts.2.w1.qweight", "model.layers.0.block_sparse_moe.experts.2.w2.g_idx",
            "model.layers.0.block_sparse_moe.gate.weight"} <= names
    assert not any(".mlp." in n for n in names)


def test_compressed_tensors_export_with_two_schemes(heldout, tmp_path):
    """group_size 64 gives the 64-column layers one group (strategy "channel") and down_proj (128 columns) two:
    one config group per scheme, each targeting its layers by name, and the logits still exact."""
    model, result = quantized(bits=4, group_size=64, sym=True)
    out = export_compressed_tensors(model, result.layers, tmp_path / "ct")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    by_strategy = {g["weights"]["strategy"]: g["targets"] for g in groups.values()}
    assert sorted(by_strategy["group"]) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert len(by_strategy["channel"]) == len(result.layers) - 2
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(loaded, heldout), logits(model, heldout))


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_int32_matches_compressed_tensors(bits):
    """Our packer gives compressed-tensors' own words, along either dimension, for lengths that fill the last word
    partly (33, 7) and exactly (64)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 2**bits, (7, 33), generator=torch.Generator().manual_seed(bits))
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors packs signed values
    assert torch.equal(pack_int32(codes, bits, dim=1), pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes, bits, dim=0), pack_to_int32(signed, bits, packed_dim=0))
    wide = torch.randint(0, 2**bits, (3, 64), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(pack_int32(wide, bits, dim=1), pack_to_int32((wide - 2 ** (bits - 1)).to(torch.int8), bits))


def test_compressed_tensors_export_of_a_tied_model_with_tokenizer(heldout, tmp_path, word_tokenizer):
    """A head tied to the embeddings is stored once, under the embedding's name, and re-tied on load."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True,
    )).eval()
    result = boa.quantize(model, boa.RTN(bits=4, group_size=32, sym=True), progress=False)
    out = export_compressed_tensors(model, result.layers, tmp_path / "ct", word_tokenizer)

    assert "lm_head.weight" not in read_safetensors(out) and "model.embed_tokens.weight" in read_safetensors(out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(loaded, heldout), logits(model, heldout))
    assert (out / "tokenizer.json").exists()


def test_compressed_tensors_refuses_act_order_groups_and_partial_groups(tmp_path):
    """What compressed-tensors cannot hold is refused with the fix named, before any folder appears."""
    model, result = quantized(**ACT_ORDER)
    with pytest.raises(boa.BoaError, match="act-order groups.*--static-groups.*--format gptq"):
        export_compressed_tensors(model, result.layers, tmp_path / "ct")
    model, result = quantized(bits=4, group_size=24)  # 64 input columns: groups of 24, 24 and 16
    with pytest.raises(boa.BoaError, match="group size 24 does not divide its 64 input columns"):
        export_compressed_tensors(model, result.layers, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_folder_it_did_not_write_and_replaces_its_own(tmp_path, folder_snapshot):
    model, result = quantized(**SETTINGS["w4g32-sym"])
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("not an export")
    before = folder_snapshot(occupied)
    for export in (export_compressed_tensors, export_gptq):
        with pytest.raises(boa.BoaError, match="not written by `boa export`"):
            export(model, result.layers, occupied)
    assert folder_snapshot(occupied) == before

    export_gptq(model, result.layers, tmp_path / "out")
    export_compressed_tensors(model, result.layers, tmp_path / "out")  # an earlier export may be replaced
    assert json.loads((tmp_path / "out" / EXPORT_MANIFEST).read_text())["format"] == "compressed-tensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied", "out"]  # no temporary folder left


# GPTQ ----------------------------------------------------------------------------------------------------------


def unpack_gptq(tensors: dict, name: str, bits: int, rows: int, cols: int):
    """(codes (rows, cols), zeros (rows, G), scales (rows, G) float32, g_idx) of one layer of a GPTQ v1 file."""
    codes = unpack_stream(tensors[f"{name}.qweight"].t(), bits, cols)            # qweight packs the input dim
    stored = unpack_stream(tensors[f"{name}.qzeros"], bits, rows).t()            # qzeros packs the output dim
    assert stored.max() <= 2**bits - 2  # zero − 1 never wraps: per-field and word-wide +1 loaders agree
    return codes, stored + 1, tensors[f"{name}.scales"].float().t(), tensors[f"{name}.g_idx"]


@pytest.mark.parametrize("settings", [*SETTINGS.values(), ACT_ORDER], ids=[*SETTINGS, "w4g16-act-order"])
def test_gptq_export_unpacks_to_boas_codes_and_grids(settings, tmp_path):
    """Read back bit by bit, the file gives boa's codes, zero points and g_idx exactly and its scales rounded to
    float16; where a zero point was 0 (which v1's zero − 1 cannot store) the group is mirrored, and every layer
    dequantizes to exactly boa's weights computed with float16 scales."""
    model, result = quantized(**settings)
    out = export_gptq(model, result.layers, tmp_path / "gptq")
    bits = settings["bits"]

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == {
        "quant_method": "gptq", "bits": bits, "group_size": settings["group_size"],
        "desc_act": settings == ACT_ORDER, "sym": settings.get("sym", False), "checkpoint_format": "gptq",
        "lm_head": False, "meta": {"quantizer": [f"boa:{boa.__version__}"]},
    }
    tensors = read_safetensors(out)
    for name, q in result.layers.items():
        rows, cols = q.codes.shape
        groups = q.scale.shape[1]
        assert f"{name}.weight" not in tensors
        assert tensors[f"{name}.qweight"].dtype == torch.int32 and tensors[f"{name}.qweight"].shape == (
            cols * bits // 32, rows)
        assert tensors[f"{name}.qzeros"].dtype == torch.int32 and tensors[f"{name}.qzeros"].shape == (
            groups, rows * bits // 32)
        assert tensors[f"{name}.scales"].dtype == torch.float16 and tensors[f"{name}.scales"].shape == (groups, rows)
        assert tensors[f"{name}.g_idx"].dtype == torch.int32 and torch.equal(tensors[f"{name}.g_idx"], q.g_idx)

        codes, zeros, scales, g_idx = unpack_gptq(tensors, name, bits, rows, cols)
        mirrored = q.zero == 0
        assert torch.equal(zeros, torch.where(mirrored, 2**bits - 1, q.zero.long()))
        assert torch.equal(scales, torch.where(mirrored, -1, 1) * q.scale.half().float())
        flip = mirrored[:, q.g_idx.long()]
        assert torch.equal(codes, torch.where(flip, 2**bits - 1 - q.codes.long(), q.codes.long()))
        g = g_idx.long()
        fp16_grids = QuantizedWeight(q.codes, q.scale.half().float(), q.zero, q.g_idx, bits)
        assert torch.equal(scales[:, g] * (codes - zeros[:, g]), fp16_grids.dequantize())


def test_gptq_stores_a_zero_point_of_zero_mirrored():
    """A group whose zero point is 0 is stored as codes maxq − c, zero maxq, scale −s: the same weights."""
    codes = torch.randint(0, 8, (32, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scale = (torch.rand(32, 2) + 0.5).half().float()  # float16 grids: the file holds them exactly
    zero = torch.randint(1, 8, (32, 2)).float()
    zero[3, 1] = zero[7, 0] = 0
    q = QuantizedWeight(codes, scale, zero, torch.arange(64, dtype=torch.int32) // 32, 3)
    t = gptq_tensors(q)
    got_codes, got_zeros, got_scales, g_idx = unpack_gptq({f"x.{k}": v for k, v in t.items()}, "x", 3, 32, 64)
    assert got_zeros[3, 1] == got_zeros[7, 0] == 7 and got_scales[3, 1] < 0 < got_scales[3, 0]
    assert torch.equal(got_codes[3, 32:], 7 - codes[3, 32:].long())
    g = g_idx.long()
    assert torch.equal(got_scales[:, g] * (got_codes - got_zeros[:, g]), q.dequantize())


def test_gptq_export_of_mixed_widths_names_the_others_in_dynamic(tmp_path):
    """Layers at other widths than most weights' (mixed precision) are GPTQModel `dynamic` overrides matching their
    full names only, and each is stored at its own width."""
    model, result = quantized(**SETTINGS["w4g32-sym"])
    first, second = list(result.layers)[:2]
    q = result.layers[second]
    three_bit = QuantizedWeight(q.codes.clamp(max=7), q.scale, q.zero.clamp(max=7), q.g_idx, 3)
    per_channel = QuantizedWeight(q.codes, q.scale[:, :1], q.zero[:, :1], torch.zeros_like(q.g_idx), 4)
    layers = {**result.layers, second: three_bit, first: per_channel}
    out = export_gptq(model, layers, tmp_path / "gptq")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"]) == (4, 32)
    assert config["dynamic"] == {f"+:^{re.escape(second)}$": {"bits": 3, "group_size": 32},
                                 f"+:^{re.escape(first)}$": {"bits": 4, "group_size": -1}}
    assert [p for p in config["dynamic"] if re.match(p[2:], second + "x")] == []
    rows, cols = q.codes.shape
    codes, zeros, scales, _ = unpack_gptq(read_safetensors(out), second, 3, rows, cols)
    assert torch.equal(scales[:, q.g_idx.long()] * (codes - zeros[:, q.g_idx.long()]),
                       QuantizedWeight(three_bit.codes, q.scale.half().float(), three_bit.zero, q.g_idx,
                                       3).dequantize())


def test_gptq_refuses_what_one_gptq_config_cannot_describe(tmp_path):
    model, result = quantized(**SETTINGS["w4g32-sym"])
    first = list(result.layers)[0]
    q = result.layers[first]
    odd = QuantizedWeight(q.codes[:40], q.scale[:40], q.zero[:40], q.g_idx, 3)  # 40 rows of 3 bits: 120 bits
    with pytest.raises(boa.BoaError, match=r"40×64; .* multiples of 32"):
        export_gptq(model, {first: odd}, tmp_path / "gptq")
    huge = QuantizedWeight(q.codes, q.scale * 1e9, q.zero, q.g_idx, 4)
    with pytest.raises(boa.BoaError, match="beyond float16's range"):
        export_gptq(model, {first: huge}, tmp_path / "gptq")
    assert list(tmp_path.iterdir()) == []
