"""GGUF export (boa.export.gguf_format): a model quantized on a GGUF type's grids becomes a llama.cpp file whose
tensors are exactly boa's weights — read back by the `gguf` package and by transformers' GGUF loader (which gives
boa's logits exactly) — with the architecture's metadata and a tokenizer; llama.cpp itself runs it where the bench's
llama.cpp venv exists."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import boa
from boa.cli import main
from boa.core.gguf_grids import GGUF_TYPES
from boa.export import export_gguf
from boa.export.gguf_format import gguf_name, interleaved_rows
from boa.generate import generate
from conftest import build_llama, random_windows

gguf = pytest.importorskip("gguf")

LLAMACPP_PYTHON = Path(os.environ.get("BOA_CACHE", Path.home() / ".cache" / "boa")) / "venvs/llamacpp/bin/python"


def wide_llama(tied: bool = False) -> transformers.LlamaForCausalLM:
    """A random Llama whose rows (256, 512) split into every GGUF type's blocks, K types' 256 included."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def byte_tokenizer():
    """A byte-level BPE tokenizer of 256 tokens (255 bytes and one merge, "ab"): the kind llama.cpp's gpt2 vocabulary
    is (it needs merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())[:255] + ["ab"]
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tokens)}, merges=[("a", "b")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", list(GGUF_TYPES))
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_gguf_export_holds_boas_weights_exactly(name, tied, tmp_path):
    model = wide_llama(tied)
    result = boa.quantize(model, boa.GPTQ(gguf=name), random_windows(4, 32), progress=False)
    out = export_gguf(model, result.layers, tmp_path / "m.gguf", name, config=result.config, float_type="f32")

    reader = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.embedding_length"] == 256 and fields["llama.feed_forward_length"] == 512
    assert fields["llama.rope.dimension_count"] == 64 and fields["llama.rope.freq_base"] == 10000.0
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (not tied)
    for module, q in result.layers.items():
        t = tensors[gguf_name(module)]
        assert t.tensor_type.name == name
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        expected = q.dequantize().float()
        if module.endswith(("q_proj", "k_proj")):  # llama.cpp's interleaved RoPE rows
            heads = 4 if module.endswith("q_proj") else 2
            expected = expected[interleaved_rows(expected.shape[0], heads)]
        assert torch.equal(got, expected), module

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    ids = random_windows(2, 16, seed=1)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_the_float_model_exports_for_llama_cpp_to_quantize(tmp_path):
    """kind F32: the unquantized model (what llama.cpp's own quantizer starts from in the bench), read back exactly."""
    model = wide_llama()
    out = export_gguf(model, {}, tmp_path / "fp.gguf", "F32")
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors} == {"F32"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    ids = random_windows(2, 16, seed=1)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_float_matrices_as_q8_0_are_llama_cpps_rounding_of_them(tied, tmp_path):
    """float_type q8_0: the embedding (and an untied head) written as Q8_0 blocks, byte for byte what the `gguf`
    package's (llama.cpp's) quantizer makes of the float matrix, within about half a Q8_0 step of it (d is a
    float16); the quantized layers stay exactly boa's; f16/f32/q8_0 only."""
    model = wide_llama(tied)
    result = boa.quantize(model, boa.RTN(gguf="Q4_0"), progress=False)
    out = export_gguf(model, result.layers, tmp_path / "m.gguf", "Q4_0", config=result.config, float_type="q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    floats = {"token_embd.weight": model.model.embed_tokens.weight}
    if not tied:
        floats["output.weight"] = model.lm_head.weight
    for name, weight in floats.items():
        t, w = tensors[name], weight.detach().float().numpy()
        assert t.tensor_type.name == "Q8_0"
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        assert np.array_equal(np.asarray(t.data).reshape(-1), gguf.quants.quantize(w, q8_0).reshape(-1))
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        step = np.abs(w.reshape(w.shape[0], -1, 32)).max(-1, keepdims=True) / 127
        assert (np.abs(got.reshape(step.shape[0], -1, 32) - w.reshape(step.shape[0], -1, 32)) <= 0.6 * step).all()
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q4_0"
    with pytest.raises(boa.BoaError, match="float_type='q4_0': use one of f16, f32, q8_0"):
        export_gguf(model, result.layers, tmp_path / "n.gguf", "Q4_0", config=result.config, float_type="q4_0")


def test_what_gguf_cannot_hold_is_refused(tmp_path):
    model = wide_llama()
    plain = boa.quantize(model, boa.RTN(bits=4, group_size=32, sym=True), progress=False)
    with pytest.raises(boa.BoaError, match="not chosen on Q4_0's grids.*--grid gguf:Q4_0"):
        export_gguf(model, plain.layers, tmp_path / "a.gguf", "Q4_0", config=plain.config)
    q41 = boa.quantize(wide_llama(), boa.RTN(gguf="Q4_1"), progress=False)
    with pytest.raises(boa.BoaError, match="quantized for Q4_1: export that type"):
        export_gguf(q41.model, q41.layers, tmp_path / "b.gguf", "Q4_0", config=q41.config)
    fit = "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0"
    with pytest.raises(boa.BoaError, match=f"Q3_K stores rows in blocks of 256.*rows of 64, 128.*{fit}"):
        boa.quantize(build_llama(), boa.RTN(gguf="Q3_K"), progress=False)
    from conftest import build_opt

    opt = build_opt()
    q = boa.quantize(opt, boa.RTN(gguf="Q8_0"), progress=False)
    with pytest.raises(boa.BoaError, match="Llama architecture.*not opt"):
        export_gguf(opt, q.layers, tmp_path / "c.gguf", "Q8_0", config=q.config)
    assert not list(tmp_path.glob("*.gguf*"))


def quantize_folder(tmp_path, calib_txt, kind: str = "Q8_0"):
    """`boa quantize` of a wide Llama folder with a byte-level BPE tokenizer, on `kind`'s grids, saved packed."""
    folder = tmp_path / "llama"
    wide_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = tmp_path / "q"
    assert main(["quantize", str(folder), "--method", "gptq", "--grid", f"gguf:{kind}", "--calib", str(calib_txt),
                 "--nsamples", "4", "--seqlen", "32", "--corpora", "", "--out", str(out)]) == 0
    return out


@pytest.fixture
def quantized_folder(tmp_path, calib_txt):
    return quantize_folder(tmp_path, calib_txt)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K"])
def test_cli_exports_a_saved_model_with_its_tokenizer(kind, tmp_path, calib_txt):
    """`boa export --format gguf` reads the packed folder (the type from its manifest) and writes the tokenizer
    llama.cpp needs; transformers reads the file as the packed model's weights (Q4_K: its block minimums saved
    and loaded as offsets)."""
    quantized_folder = quantize_folder(tmp_path, calib_txt, kind)
    out = tmp_path / "m.gguf"
    assert main(["export", str(quantized_folder), "--format", "gguf", "--out", str(out), "--float-type", "f32"]) == 0
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 256
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and t.name.endswith("proj")} <= {
        kind}
    packed, tokenizer, _ = boa.load(quantized_folder)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    modules = dict(loaded.named_modules())
    quantized = [(name, layer) for name, layer in packed.named_modules() if isinstance(layer, boa.nn.QuantLinear)]
    assert quantized and all((layer.offsets is not None) == (kind == "Q4_K") for _, layer in quantized)
    for name, layer in quantized:
        assert torch.equal(modules[name].weight, layer.quantized_weight().dequantize()), name
    ids = random_windows(2, 16, seed=1)
    assert torch.equal(logits(loaded, ids), logits(packed, ids))  # the packed layers run what the file holds
    ours, theirs = (generate(packed, tokenizer, "abab", max_new_tokens=8, stop_at_eos=False, engine=engine).tokens
                    for engine in ("boa", "transformers"))  # boa's decode loop (offsets: torch layers) too
    assert ours == theirs


def test_block_minimums_are_refused_by_the_integer_zero_point_formats(tmp_path):
    model = wide_llama()
    result = boa.quantize(model, boa.RTN(gguf="Q4_K"), progress=False)
    for fmt, export in (("GPTQ format", boa.export.export_gptq),
                        ("compressed-tensors", boa.export.export_compressed_tensors)):
        with pytest.raises(boa.BoaError, match=f"block minimums.*which (the )?{fmt} cannot hold.*--format gguf"):
            export(model, result.layers, tmp_path / fmt, config=result.config)


LLAMACPP_LOGITS = r"""
import json, sys, numpy as np, llama_cpp
path, ids = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_default_params()
params.use_extra_bufts = False  # ggml's AMX buffer type crashes on Intel AMX machines
model = llama_cpp.llama_model_load_from_file(path.encode(), params)
context_params = llama_cpp.llama_context_default_params()
context_params.n_ctx = context_params.n_batch = 64
context_params.n_threads = context_params.n_threads_batch = 1
ctx = llama_cpp.llama_init_from_model(model, context_params)
batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
batch.n_tokens = len(ids)
for i, t in enumerate(ids):
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
    batch.seq_id[i][0] = 0
assert llama_cpp.llama_decode(ctx, batch) == 0
n = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
print(json.dumps([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n,)).tolist()
                  for i in range(len(ids))]))
"""


@pytest.mark.skipif(not LLAMACPP_PYTHON.exists(), reason="llama.cpp's venv (made by bench/peer_llamacpp.py) is absent")
@pytest.mark.parametrize("kind", ["Q8_0", "Q3_K", "Q2_K", "Q4_K"])
def test_llama_cpp_runs_the_export_and_agrees_with_boa(kind, tmp_path, calib_txt):
    """llama.cpp loads the file and computes boa's logits up to its own arithmetic (it rounds activations to 8 bits
    for quantized matrices): the logits within 2% of their range, the top tokens the same but for near-ties."""
    quantized_folder = quantize_folder(tmp_path, calib_txt, kind)
    out = tmp_path / "m.gguf"
    assert main(["export", str(quantized_folder), "--format", "gguf", "--out", str(out)]) == 0
    ids = random_windows(1, 24, seed=5)[0].tolist()
    run = subprocess.run([str(LLAMACPP_PYTHON), "-c", LLAMACPP_LOGITS, str(out), ",".join(map(str, ids))],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = torch.tensor(json.loads(run.stdout.splitlines()[-1]))
    packed, _, _ = boa.load(quantized_folder)
    ours = logits(packed, torch.tensor([ids]))[0]
    tolerance = 0.02 * (ours.max() - ours.min())
    assert (theirs - ours).abs().max() <= tolerance
    # every position's top token in llama.cpp is boa's, or one boa scores within the tolerance of its top (this tiny
    # random model has near-ties, which the 8-bit activations may flip)
    chosen = ours.gather(-1, theirs.argmax(-1, keepdim=True))[:, 0]
    assert (chosen >= ours.max(-1).values - tolerance).all()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
