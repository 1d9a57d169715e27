"""boa's own checkpoint format: one folder that `boa.load` turns back into a model.

    config.json, tokenizer files      the base model's, as transformers writes them
    quantization.json                 {"format": "boa", "version", "config": QuantConfig.to_dict(), "fingerprint",
                                      "calibration": {nsamples, seqlen, sha256, ...} or null, "dtype", "layers",
                                      "config_sha256": of config.json, "manifest_sha256": of the rest of this file}
    model.safetensors                 every tensor that is not quantized (embeddings, norms, biases, lm_head) under
                                      its state-dict name, and per quantized layer NAME its packed weight
                                      as stored (boa/core/packed.py, PackedWeight.stored): NAME.qweight uint8,
                                      NAME.scales float16/bfloat16 where exact (else float32), NAME.zeros uint8
                                      (b-bit codes packed), NAME.perm int32 (act-order only), NAME.offsets like
                                      the scales (GGUF's block minimums only); its bits, group_size and in_features
                                      are in quantization.json's "layers". Past max_shard_size (5 GB) the same
                                      tensors go into model-0000K-of-0000N.safetensors shards with
                                      model.safetensors.index.json (boa/core/shards.py), every shard's header
                                      carrying the run's fingerprint
Versions 1 (unpacked: NAME.codes uint8 (out, in), NAME.scale, NAME.zero, NAME.g_idx) and 2 (packed codes, float32
scales, a byte per zero point) are still read.

`load` trusts nothing it can check: the manifest's own checksum (an edited field is refused), config.json's,
each weight file's run fingerprint (in its header) against the manifest's, and every packed layer's widths, shapes,
finite scales and zero points against the architecture (PackedWeight.check). Manifests of earlier versions carry no
checksums; their layers are still checked.

No pickle: tensors go through safetensors, everything else through JSON.
"""
from __future__ import annotations

import hashlib
import json
from operator import attrgetter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from boa.config import QuantConfig
from boa.core.errors import BoaError
from boa.core.output import read_manifest as _read_manifest
from boa.core.output import writing_output
from boa.core.packed import PackedWeight, pack
from boa.core.shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter, parse_size, weight_files
from boa.core.quantizer import QuantizedWeight
from boa.export.common import plain_tensors
from boa.models.adapter import adapter_for
from boa.models.weights import StreamedModel
from boa.nn.quant_linear import pack_model

FORMAT_VERSION = 3
READS = (1, 2, 3)
MANIFEST = "quantization.json"
WEIGHTS = "model.safetensors"


def read_manifest(folder) -> dict | None:
    return _read_manifest(folder, MANIFEST)


def _unquantized(result):
    """(name, tensor) of every tensor that is not a quantized weight, one read at a time for a streamed run."""
    weights = result.weights
    if weights is None or not isinstance(weights, StreamedModel):
        yield from plain_tensors(result.model, result.layers).items()
        return
    quantized = set(result.layers)
    if weights.on_load:  # transformed as they are read: module by module, through the transforms
        yield from _transformed_unquantized(weights, quantized)
        return
    for name, _ in weights.model.named_parameters():  # a tied head once, under the embedding's name
        owner, leaf = name.rsplit(".", 1)
        if owner in quantized and leaf != "bias":
            continue
        yield name, weights.tensor(name)


def _transformed_unquantized(weights, quantized: set[str]):
    """A streamed model whose transforms fuse into each module as it is read (a rotation): each module holding
    unquantized tensors — those outside the blocks, every block, the head — is loaded (so transformed), its tensors
    given, and released: one block in memory at a time."""
    model = weights.model
    adapter = adapter_for(model.config)
    wanted = {name for name, _ in model.named_parameters()  # a tied head once, under the embedding's name
              if not (name.rsplit(".", 1)[0] in quantized and not name.endswith(".bias"))}
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings()
    for module in [*weights.outside_blocks(adapter.blocks_path), *adapter.blocks(model), *filter(None, [head])]:
        prefix = names[id(module)]
        mine = [f"{prefix}.{local}" if prefix else local for local, _ in module.named_parameters()]
        if not wanted.intersection(mine):
            continue
        weights.load(module)
        for local, param in module.named_parameters():
            name = f"{prefix}.{local}" if prefix else local
            if name in wanted:
                wanted.discard(name)
                yield name, param.detach()
        weights.release(module)


def save(result, folder, tokenizer=None, max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes a QuantResult (see boa.quantize) to `folder`, atomically, in shards of at most max_shard_size (e.g.
    "5GB") holding one tensor in memory at a time; then the run's checkpoint (folder.partial) is removed."""
    folder = Path(folder)
    model = result.model
    layers = {}
    manifest = {
        "format": "boa",
        "version": FORMAT_VERSION,
        "config": result.config.to_dict(),
        "fingerprint": result.fingerprint,
        "calibration": result.calibration,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "layers": layers,
    }
    with writing_output(folder, MANIFEST, manifest, fingerprint=result.fingerprint, writer="boa quantize",
                        checkpoint=True) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        writer = ShardWriter(tmp, parse_size(max_shard_size), metadata={"boa_fingerprint": result.fingerprint})
        for name, tensor in _unquantized(result):
            writer.add(name, tensor)
        for name, q in result.layers.items():
            packed = pack(q)
            for key, tensor in packed.stored().items():
                writer.add(f"{name}.{key}", tensor)
            layers[name] = {"bits": packed.bits, "group_size": packed.group_size, "in_features": packed.in_features}
        writer.finish()
        manifest["config_sha256"] = _sha256(tmp / "config.json")  # the manifest itself is written last
        manifest["manifest_sha256"] = _manifest_digest(manifest)
    return folder


def load(folder, device: str = "cpu"):
    """(model with QuantLinear layers, tokenizer or None, QuantConfig) from a folder written by `save`."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise BoaError(f"{folder} is not a boa-quantized model (no {MANIFEST}); quantize it first with `boa quantize`")
    version = manifest.get("version")
    if version not in READS:
        raise BoaError(f"{folder} was written by format version {version}; this boa reads versions {READS}")
    _check_companions(folder, manifest)
    config = AutoConfig.from_pretrained(folder)
    if manifest.get("dtype") not in ("float32", "float16", "bfloat16"):
        raise BoaError(f"{folder}/{MANIFEST} names dtype {manifest.get('dtype')!r}; the file is damaged")
    dtype = getattr(torch, manifest["dtype"])
    model = adapter_for(config).model_class.from_config(config, dtype=dtype)
    adapter_for(config).unfuse_experts(model)  # an MoE model's experts were saved one by one
    tensors = {}
    for path in weight_files(folder):
        tensors.update(load_file(str(path)))
    layers = {}
    for name, info in manifest["layers"].items():
        try:
            module = attrgetter(name)(model)
        except AttributeError:
            raise BoaError(f"{folder}'s {MANIFEST} names a layer {name} that this {config.model_type} model does not "
                           "have; the manifest or config.json was edited, or belongs to another model") from None
        if module.bias is not None and f"{name}.bias" not in tensors:
            raise BoaError(f"{folder} is missing the bias of {name}; the file is damaged")
        try:
            layers[name] = _read_layer(tensors, name, info, version)
        except KeyError as err:
            raise BoaError(f"{folder} is missing {err.args[0]}; the file is damaged") from None
        if isinstance(layers[name], PackedWeight):
            layers[name].check(name, module.out_features, module.in_features)
    pack_model(model, layers, dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise BoaError(f"{folder} holds tensors this architecture does not have: {unexpected[:5]}")
    model.tie_weights()
    still_missing = [k for k in missing if not k.startswith(tuple(f"{name}." for name in manifest["layers"]))]
    tied = {k for k in still_missing if _is_tied(model, k)}
    if set(still_missing) - tied:
        raise BoaError(f"{folder} is missing tensors {sorted(set(still_missing) - tied)[:5]}; the file is damaged")
    quant_config = QuantConfig.from_dict(manifest["config"])
    for transform in quant_config.transforms:  # the weights hold the fused part; the run-time part is rebuilt
        transform.attach(model, adapter_for(config))
    if quant_config.transforms:
        model.boa_transforms = quant_config.transforms
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model.to(device).eval(), tokenizer, quant_config


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_digest(manifest: dict) -> str:
    rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _check_companions(folder: Path, manifest: dict) -> None:
    """The manifest is as written, and config.json and model.safetensors are the ones written with it (manifests of
    earlier boa versions record none of this, and pass)."""
    recorded = manifest.get("manifest_sha256")
    if recorded is not None and recorded != _manifest_digest(manifest):
        raise BoaError(f"{folder}/{MANIFEST} was edited after boa wrote it (its checksum differs); restore it or "
                       "quantize again")
    files = weight_files(folder)
    for path in files:
        if not path.exists():
            raise BoaError(f"{folder} has no {path.name}; the folder is incomplete — quantize the model again")
    expected = manifest.get("config_sha256")
    if expected is not None and _sha256(folder / "config.json") != expected:
        raise BoaError(f"{folder}/config.json is not the one saved with this model (another model's, or edited); "
                       "restore it or quantize again")
    for path in files:
        try:
            with safe_open(str(path), "pt") as f:
                written_by = (f.metadata() or {}).get("boa_fingerprint")
        except Exception as err:  # safetensors' own error types for a truncated or garbled file
            raise BoaError(f"{path} is damaged ({err}); quantize the model again") from None
        if written_by is not None and written_by != manifest.get("fingerprint"):
            raise BoaError(f"{path} comes from another quantization run than its {MANIFEST}; keep the folder's "
                           "files together as boa wrote them, or quantize again")


def _read_layer(tensors: dict, name: str, info: dict, version: int) -> QuantizedWeight | PackedWeight:
    if version == 1:
        return QuantizedWeight(*(tensors.pop(f"{name}.{k}") for k in QuantizedWeight.GRID_PARTS), info["bits"])
    parts = {key: tensors.pop(f"{name}.{key}") for key in ("qweight", "scales", "zeros")}
    parts.update({key: tensors.pop(f"{name}.{key}") for key in ("perm", "offsets") if f"{name}.{key}" in tensors})
    return PackedWeight.from_stored(parts, info["bits"], info["in_features"], info["group_size"])


def _is_tied(model, key: str) -> bool:
    """Whether a state-dict key shares its storage with another key (so saving it once was enough)."""
    state = model.state_dict()
    return any(k != key and v.data_ptr() == state[key].data_ptr() for k, v in state.items())
