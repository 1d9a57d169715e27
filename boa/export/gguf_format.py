"""GGUF export for llama.cpp: a model quantized on a GGUF type's grids (`--grid gguf:TYPE`, boa.core.gguf_grids)
written as that type's blocks, so llama.cpp runs exactly the weights boa evaluated; nothing is rounded again.

One file, written with the `gguf` package (the format's own library): the architecture's metadata (llama.cpp's key
names), the tokenizer (copied from a GGUF that has it — `vocab_from`, e.g. the built-in model's own file — or built
from the Hugging Face tokenizer's BPE vocabulary and merges), and the tensors under llama.cpp's names: the quantized
layers in the type's blocks, norms in F32, other matrices (embeddings, an untied head) in F16 (or F32, or Q8_0 —
rounded as llama.cpp rounds them, so no longer exactly the matrices boa evaluated, and half F16's bytes: llama.cpp's own
files hold them so, and with a tied head the embedding is what every decode step reads most). llama.cpp's
llama architecture rotates q and k in interleaved pairs where transformers rotates halves: their rows are permuted
as llama.cpp's own converter does (a row permutation of the codes and grids, exact).

Models: the Llama architecture (Llama, Mistral, SmolLM2: model_type llama / mistral).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from boa.core.errors import BoaError
from boa.core.gguf_grids import encode_rows, gguf_type
from boa.core.quantizer import QuantizedWeight
from boa.models.adapter import adapter_for

ARCHITECTURES = ("llama", "mistral")
# transformers' names inside a Llama block -> llama.cpp's
BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
FLOAT_TYPES = ("f16", "f32", "q8_0")  # how the matrices left unquantized are written
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(module: str) -> str:
    """llama.cpp's tensor name for a transformers Llama module (its .weight)."""
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.weight"
    parts = module.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in BLOCK_NAMES:
        return f"blk.{parts[2]}.{BLOCK_NAMES['.'.join(parts[3:])]}.weight"
    raise BoaError(f"{module} has no place in llama.cpp's llama architecture")


def interleaved_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp's llama RoPE wants of a q or k projection with `heads` heads: in each head, row i of
    the first half then row i of the second (transformers keeps the halves apart)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def check_exportable(model: nn.Module, layers: dict[str, QuantizedWeight], kind_name: str | None, config) -> None:
    """That the model's architecture and `layers` (their grids: `kind_name`'s, None for a float export) fit."""
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise BoaError(f"GGUF export writes the Llama architecture ({', '.join(ARCHITECTURES)}) for now, not "
                       f"{model_type}; keep boa's own format or export compressed-tensors")
    if getattr(model, "boa_transforms", ()):
        raise BoaError("this model was quantized with rotations or quantized activations, which llama.cpp's llama "
                       "architecture cannot run; export a weight-only model")
    if kind_name is None:
        return
    kind = gguf_type(kind_name)
    quantized_as = getattr(getattr(config, "method", None), "spec", None)
    if quantized_as is not None and quantized_as.gguf != kind.name:
        hint = "" if quantized_as.gguf is None else f" (it was quantized for {quantized_as.gguf}: export that type)"
        raise BoaError(f"this model's codes were not chosen on {kind.name}'s grids{hint}; quantize it with --grid "
                       f"gguf:{kind.name} so that llama.cpp runs the weights boa evaluated")
    if not layers:
        raise BoaError("the model has no quantized layers to export; quantize it first with `boa quantize`")
    for name, q in layers.items():
        if not torch.equal(q.g_idx.long(), torch.arange(q.codes.shape[1]) // kind.block):
            raise BoaError(f"{name}: its groups are not consecutive blocks of {kind.block} columns ({kind.name}'s); "
                           "quantize with --grid gguf:TYPE (act-order needs --static-groups)")


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if parameters.get("rope_type", parameters.get("type", "default")) != "default":
        raise BoaError("this model scales its RoPE (rope_scaling), which boa's GGUF export does not write yet")
    return float(parameters.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def _add_metadata(writer, config, kind_name: str) -> None:
    import gguf

    adapter = adapter_for(config)
    writer.add_name(getattr(config, "_name_or_path", "") or "boa model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(adapter.n_heads)
    writer.add_head_count_kv(adapter.n_kv_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(adapter.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    # llama.cpp's name of a file mostly in one type (Q3_K_S: every matrix Q3_K)
    small = {name: f"MOSTLY_{name}_S" for name in ("Q3_K", "Q4_K", "Q5_K")}  # every matrix of the type: its _S mix
    file_type = {**small, "F32": "ALL_F32"}.get(kind_name, f"MOSTLY_{kind_name}")  # Q2_K, Q6_K: MOSTLY_Q2_K, …
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_key_value("boa.grid", kind_name, gguf.GGUFValueType.STRING)


def _copy_tokenizer(writer, source: Path, vocab_size: int) -> None:
    """Every tokenizer.* field of the GGUF `source`, as it is."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        raise BoaError(f"{source} has no tokenizer of this model's {vocab_size} tokens to copy")
    for key, field in fields.items():
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


def _build_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (GPT-2 style: tokenizer.json with a vocabulary and merges) in llama.cpp's terms."""
    import json

    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = state.get("model", {})
    if model.get("type") != "BPE" or "merges" not in model:
        raise BoaError("this tokenizer is not a byte-level BPE boa can write to GGUF; give --vocab-from a GGUF file of "
                       "the same model (its tokenizer is copied)")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.CONTROL if t in special else
             gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(token_id)


def export_gguf(model: nn.Module, layers: dict[str, QuantizedWeight], out_file, kind_name: str, tokenizer=None,
                config=None, vocab_from: str | Path | None = None, float_type: str = "f16") -> Path:
    """Writes `model` (fake-quantized, or loaded by boa.load) with its quantized `layers` {module name:
    QuantizedWeight}, chosen on `kind_name`'s grids, to the GGUF file `out_file` (atomically). `config`: the boa
    QuantConfig (checked to be that type's); vocab_from: a GGUF whose tokenizer is copied; float_type: f16, f32 or
    q8_0 for the matrices left unquantized (q8_0: rounded by the `gguf` package, llama.cpp's Q8_0). kind_name F16
    or F32: the unquantized model (`layers` unused), e.g. for llama.cpp's own quantizer."""
    import gguf

    if float_type not in FLOAT_TYPES:
        raise BoaError(f"float_type={float_type!r}: use one of {', '.join(FLOAT_TYPES)}")
    unquantized = kind_name.upper() in ("F16", "F32")  # the float model, for llama.cpp to quantize itself
    if unquantized:
        float_type, kind, layers = kind_name.lower(), None, {}
        check_exportable(model, {}, None, None)
    else:
        kind = gguf_type(kind_name)
        check_exportable(model, layers, kind.name, config)
    hf = model.config
    out_file = Path(out_file)
    if out_file.suffix != ".gguf":
        raise BoaError(f"{out_file}: a GGUF export is one file; name it *.gguf")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    _add_metadata(writer, hf, kind_name.upper() if unquantized else kind.name)
    if vocab_from is not None:
        _copy_tokenizer(writer, Path(vocab_from), hf.vocab_size)
    elif tokenizer is not None:
        _build_tokenizer(writer, tokenizer, hf.vocab_size)

    qtype = None if unquantized else getattr(gguf.GGMLQuantizationType, kind.name)
    adapter = adapter_for(hf)
    heads = {adapter.q_proj: adapter.n_heads, adapter.k_proj: adapter.n_kv_heads}
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    written = set()
    for name, tensor in model.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        if (module == "lm_head" and tied) or module in written:
            continue
        role = ".".join(module.split(".")[3:])
        if module in layers:  # its fake-quantized weight, or a packed layer's buffers: written from its codes
            q = layers[module]
            if role in heads:
                q = q.take_rows(interleaved_rows(q.codes.shape[0], heads[role]))
            writer.add_tensor(gguf_name(module), encode_rows(kind, q.codes, q.scale, q.zero, q.offset), raw_dtype=qtype)
            written.add(module)
            continue
        if leaf != "weight":
            raise BoaError(f"{name}: llama.cpp's llama architecture has no place for it")
        target = gguf_name(module)
        if role in heads:
            tensor = tensor[interleaved_rows(tensor.shape[0], heads[role])]
        array = tensor.detach().float().cpu().numpy()
        if array.ndim == 1 or float_type == "f32":
            writer.add_tensor(target, array)
        elif float_type == "q8_0" and array.shape[-1] % 32 == 0:
            q8_0 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(target, gguf.quants.quantize(array, q8_0), raw_dtype=q8_0)
        else:  # f16, and q8_0's fallback for rows that are not whole blocks of 32
            writer.add_tensor(target, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, out_file)
    return out_file
