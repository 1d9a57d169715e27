"""The attention capture against what the models' own (eager) attention computes: post-RoPE Q and K, attention
probabilities (causal, GQA, bidirectional, padded), the block_v Hessians, and RoPE back-rotation against explicit
rotation matrices."""
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from boa.models.adapter import adapter_for
from boa.stats import AttentionRecorder, LayerStats, attention_layer_stats, back_rotate
from boa.stats.collect import collect_statistics
from boa.stats.attention import attention_probabilities

from conftest import VOCAB, build_bert, build_gemma3, build_llama, build_opt, random_windows


class KeepingRecorder(AttentionRecorder):
    """Also keeps the raw query, key and probabilities it was shown."""

    def record(self, which, module, query, key, attention_mask, scaling):
        self.seen = (query, key, attention_probabilities(module, query, key, attention_mask, scaling))
        super().record(which, module, query, key, attention_mask, scaling)


def build_qwen3():
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64)
    model = Qwen3ForCausalLM(config).float().eval()
    with torch.no_grad():  # non-trivial norm weights, so that the norm matters
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


def build_phi3():
    """A random Phi-3 with its fused projections split, as boa.quantize runs it."""
    from transformers import Phi3Config, Phi3ForCausalLM
    from boa.models.fused import split_fused

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                       max_position_embeddings=64, pad_token_id=0)).eval()
    split_fused(model, adapter_for(model.config))
    return model


def capture_layer0(model, input_ids, attention_mask=None, index=0):
    """Runs block `index` (0) with its attention captured, on the inputs and kwargs (masks, position embeddings) the model
    gives it under its default attention (sdpa), as the pipeline does; returns the adapter, the block, the
    recorder, the v_proj input, and block 0's eager attention probabilities for comparison."""
    adapter = adapter_for(model.config)
    block = adapter.blocks(model)[index]
    attention = block.get_submodule(adapter.attention)
    seen = {}
    hooks = [
        block.register_forward_pre_hook(lambda m, args, kwargs: seen.setdefault("call", (args, kwargs)),
                                        with_kwargs=True),
        block.get_submodule(adapter.v_proj).register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0])),
    ]
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    for hook in hooks:
        hook.remove()
    recorder = KeepingRecorder(values=True, dtype=torch.float64)
    watch = recorder.watch_values(block.get_submodule(adapter.v_proj))
    args, kwargs = seen["call"]
    with torch.no_grad(), adapter.capturing({"quantized": attention}, recorder):
        block(*args, **kwargs)
    watch.remove()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions[index]
    return adapter, block, recorder, seen["x"], eager


@pytest.mark.parametrize("build,index", [(build_llama, 0), (build_opt, 0), (build_qwen3, 0), (build_bert, 0),
                                         (build_gemma3, 0), (build_gemma3, 1), (build_phi3, 0)],
                         ids=["llama", "opt", "qwen3", "bert", "gemma3_sliding", "gemma3_full", "phi3"])
def test_captured_probabilities_equal_the_models_own(build, index):
    model = build()
    ids = random_windows(3, 16)
    adapter, block, recorder, x, eager = capture_layer0(model, ids, index=index)
    query, key, probs = recorder.seen
    assert query.shape[1] == adapter.n_heads and key.shape[1] == adapter.n_kv_heads
    torch.testing.assert_close(probs, eager.float(), atol=1e-5, rtol=1e-4)
    if build is not build_bert:  # causal: nothing above the diagonal
        assert float(probs.triu(1).abs().max()) == 0
    if build is build_gemma3:  # the sliding window: nothing 5 or more positions back, but on the global layer
        assert (float(probs.tril(-5).abs().max()) == 0) == (index == 0)


def test_padding_mask_is_applied_for_encoders():
    model = build_bert()
    ids = random_windows(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    _, _, recorder, _, eager = capture_layer0(model, ids, mask)
    probs = recorder.seen[2]
    torch.testing.assert_close(probs, eager.float(), atol=1e-5, rtol=1e-4)
    assert float(probs[1, :, :, 8:].abs().max()) < 1e-6


@pytest.mark.parametrize("build,index", [(build_llama, 0), (build_qwen3, 0), (build_gemma3, 0), (build_gemma3, 1)])
def test_captured_query_and_key_are_the_rotated_projections(build, index):
    """q_t = R_t · norm(W_q x_t), with R_t from adapter.rotary_matrices, equals what attention received (Gemma 3:
    local and global RoPE)."""
    model = build()
    ids = random_windows(2, 16)
    adapter, block, recorder, x, _ = capture_layer0(model, ids, index=index)
    query, key, _ = recorder.seen
    attention = block.get_submodule(adapter.attention)
    R = adapter.rotary_matrices(model, attention, 16)
    d = adapter.head_dim
    with torch.no_grad():
        for proj, norm, got in (("q_proj", "q_norm", query), ("k_proj", "k_norm", key)):
            pre = getattr(attention, proj)(x).reshape(2, 16, -1, d)
            if hasattr(attention, norm):
                pre = getattr(attention, norm)(pre)
            expected = torch.einsum("tij,bthj->bhti", R, pre)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def explicit_rotation(cos, sin):
    """The half-split rotary matrix [[diag cos, −diag sin], [diag sin, diag cos]] for one position."""
    half = cos.shape[0] // 2
    c, s = torch.diag(cos[:half]), torch.diag(sin[:half])
    return torch.cat([torch.cat([c, -s], 1), torch.cat([s, c], 1)], 0)


def test_back_rotation_against_explicit_rotation_matrices():
    model = build_llama()
    adapter = adapter_for(model.config)
    attention = adapter.blocks(model)[0].get_submodule(adapter.attention)
    L, d = 20, adapter.head_dim
    R = adapter.rotary_matrices(model, attention, L)
    cos, sin = model.model.rotary_emb(torch.zeros(1, L, d), torch.arange(L)[None])
    explicit = torch.stack([explicit_rotation(cos[0, t], sin[0, t]) for t in range(L)])
    torch.testing.assert_close(R, explicit, atol=1e-6, rtol=1e-5)
    C = torch.randn(3, d, d, dtype=torch.float64)
    C = C @ C.transpose(-1, -2)
    expected = sum(explicit[t].double().T @ C @ explicit[t].double() for t in range(L)) / L
    torch.testing.assert_close(back_rotate(C, R, chunk=7), expected)


def test_recorded_means_equal_explicit_statistics():
    """finish(): 2E[q qᵀ] per q head, 2E[k kᵀ] per kv head, and block_v's 2E[(A_h X)(A_h X)ᵀ] averaged over the q
    heads that share a kv head (GQA 4 -> 2)."""
    model = build_llama()
    ids = random_windows(3, 16)
    adapter, _, recorder, x, eager = capture_layer0(model, ids)
    query, key, _ = recorder.seen
    got = recorder.finish()
    n = 3 * 16
    q = query.double().permute(1, 0, 2, 3).reshape(4, n, -1)
    k = key.double().permute(1, 0, 2, 3).reshape(2, n, -1)
    torch.testing.assert_close(got["query"], 2 * q.transpose(1, 2) @ q / n)
    torch.testing.assert_close(got["key"], 2 * k.transpose(1, 2) @ k / n)
    AX = (eager.double() @ x.double().unsqueeze(1)).permute(1, 0, 2, 3).reshape(4, n, -1)
    per_q_head = 2 * AX.transpose(1, 2) @ AX / n
    torch.testing.assert_close(got["value_H"], per_q_head.reshape(2, 2, 64, 64).mean(1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("build", [build_qwen3, build_gemma3])
def test_qk_norm_linearisation_scales_the_row_factors_by_gamma(build):
    """Qwen3's q/k norms multiply by w, Gemma 3's by 1 + w (and Gemma has one kv head for 4 query heads)."""
    model = build()
    adapter = adapter_for(model.config)
    block = adapter.blocks(model)[0]
    attention = block.get_submodule(adapter.attention)
    calib = [random_windows(2, 16)]
    embeds = [model.model.embed_tokens(calib[0]).detach()]
    rope = (attention.layer_type,) if build is build_gemma3 else ()
    cos_sin = model.model.rotary_emb(embeds[0], torch.arange(16)[None], *rope)
    kwargs = [{"position_embeddings": cos_sin, "attention_mask": None}]
    group = [adapter.q_proj, adapter.k_proj, adapter.v_proj]
    recorder = AttentionRecorder(values=True, dtype=torch.float64, stop=True)
    with torch.no_grad():
        hessians = collect_statistics(block, group, embeds, kwargs, torch.float64, recorder=recorder, adapter=adapter)
    means = recorder.finish()
    R = adapter.rotary_matrices(model, attention, 16)
    stats = attention_layer_stats(adapter, block, hessians[adapter.q_proj], means, R, "exact")
    gamma_q = attention.q_norm.weight.detach().double() + (1 if build is build_gemma3 else 0)
    shared = adapter.n_heads // adapter.n_kv_heads
    plain = back_rotate(means["key"], R).repeat_interleave(shared, dim=0)
    torch.testing.assert_close(stats[adapter.q_proj].H_out, gamma_q[:, None] * plain * gamma_q[None, :])
    # v_proj's exact row factor: the out-projection columns of each head, averaged over the heads sharing a kv head
    W_o = attention.o_proj.weight.detach().double()
    per_head = [W_o[:, h * 16 : (h + 1) * 16] for h in range(adapter.n_heads)]
    expected = torch.stack([sum(per_head[shared * g + j].T @ per_head[shared * g + j] for j in range(shared)) / shared
                            for g in range(adapter.n_kv_heads)])
    torch.testing.assert_close(stats[adapter.v_proj].H_out, expected)
    assert isinstance(stats[adapter.v_proj], LayerStats) and stats[adapter.v_proj].H.shape == (adapter.n_kv_heads,
                                                                                               64, 64)


def test_value_dx_term_equals_explicit_cross_covariance():
    """value_D = 2E[(A_fp X_fp − A_q X_q)(A_q X_q)ᵀ] per q head, averaged over the heads sharing a kv head, with the
    FP call's query/key/input as the reference; probabilities written out here with an explicit causal mask."""
    model = build_llama()
    attention = adapter_for(model.config).blocks(model)[0].get_submodule("self_attn")
    g = torch.Generator().manual_seed(0)
    b, T, C, d = 2, 6, 64, 16

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, x = rand(b, 4, T, d), rand(b, 2, T, d), rand(b, T, C)
    q_fp, k_fp, x_fp = q + 0.1 * rand(b, 4, T, d), k + 0.1 * rand(b, 2, T, d), x + 0.1 * rand(b, T, C)
    recorder = AttentionRecorder(values=True, dtype=torch.float64)
    recorder.x = x
    recorder.reference = (q_fp, k_fp, None, 0.25, x_fp)
    recorder.record("quantized", attention, q, k, None, 0.25)
    got = recorder.finish()["value_D"]

    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)

    def head_values(query, key, inputs):
        key = key.repeat_interleave(2, dim=1)
        probs = torch.softmax(query @ key.transpose(-1, -2) * 0.25 + causal, dim=-1)
        return probs @ inputs.unsqueeze(1)                                   # (b, heads, T, C)

    y, y_fp = head_values(q, k, x), head_values(q_fp, k_fp, x_fp)
    per_head = 2 * torch.einsum("bhti,bhtj->hij", y_fp - y, y) / (b * T)
    torch.testing.assert_close(got, per_head.reshape(2, 2, C, C).mean(1), atol=1e-5, rtol=1e-4)  # fp32 softmax


def test_capture_registers_with_transformers_on_first_use_not_at_import():
    """Importing boa's LLM path leaves transformers' attention registry as it was; the first capture adds boa's."""
    import subprocess
    import sys

    code = ("import boa.pipeline, boa.stats, boa.models\n"
            "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n"
            "from boa.models.attention_capture import CAPTURE\n"
            "assert CAPTURE not in ALL_ATTENTION_FUNCTIONS, 'registered at import'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    model = build_llama()
    capture_layer0(model, random_windows(1, 8))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from boa.models.attention_capture import CAPTURE

    assert CAPTURE in ALL_ATTENTION_FUNCTIONS
    assert model.config._attn_implementation != CAPTURE  # restored after the capture


@pytest.mark.parametrize("mask", ["causal", "sliding", "padded", "none"])
def test_gram_of_rows_equals_the_dense_product(mask):
    """Σ_g A_gᵀ B_g with the zeros of causal, sliding-window, left-padded and no masks skipped: the dense product,
    within float32 rounding (the blocks sum in another order)."""
    from boa.stats.attention import gram_of_rows

    g = torch.Generator().manual_seed(0)
    T = 200  # not a multiple of the row block
    allowed = {"causal": torch.ones(T, T, dtype=torch.bool).tril(),
               "sliding": torch.ones(T, T, dtype=torch.bool).tril() & ~torch.ones(T, T, dtype=torch.bool).tril(-40),
               "padded": torch.ones(T, T, dtype=torch.bool).tril() & (torch.arange(T) >= 30),
               "none": torch.ones(T, T, dtype=torch.bool)}[mask]
    A, B = (torch.softmax(torch.randn(2, 3, T, T, generator=g).masked_fill(~allowed, float("-inf")), -1)
            .nan_to_num() for _ in range(2))  # padded rows that attend nowhere: all zero
    dense = A.reshape(2, 3 * T, T).transpose(-1, -2) @ B.reshape(2, 3 * T, T)
    torch.testing.assert_close(gram_of_rows(A, B), dense, atol=1e-5, rtol=1e-5)
