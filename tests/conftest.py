"""Shared fixtures: tiny random-weight Hugging Face models of every supported architecture,
built once per test run with transformers, and the real SmolLM2 GGUF (fetched once into the
cache). transformers itself is the reference the model tests compare against."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a model hub

# Odd sizes on purpose: hidden not a power of two, GQA, several layers.
TINY = dict(vocab_size=300, hidden_size=96, intermediate_size=136, num_hidden_layers=3,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512)

ARCHS = {
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                  rope_theta=10000.0),
    "llama_bias": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mistral": dict(sliding_window=8, rope_theta=1e6),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": dict(head_dim=32, num_attention_heads=4, rope_theta=1e6),
    # every linear a multiple of 32 columns, so GGUF tests can quantize all of them; tied head
    "llama_gguf": dict(intermediate_size=160, tie_word_embeddings=True),
    # mixtures of experts, top-2: Mixtral (4 experts of the MLP's size, always renormalised),
    # Qwen2-MoE (6 experts, a gated shared expert, layer 1 dense, no renormalisation),
    # Qwen3-MoE (8 experts, renormalised, q/k norm)
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, intermediate_size=160),
    "qwen2_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40, shared_expert_intermediate_size=56,
                      decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=40, norm_topk_prob=True, head_dim=32,
                      num_attention_heads=4, rope_theta=1e6),
}


# Models that are not in every layout grid: a Qwen3 for prompts of thousands of tokens
# (context parallelism).
MORE = {"qwen3_long": dict(ARCHS["qwen3"], max_position_embeddings=4608)}


def build_hf_model(arch, folder, seed=0, **save_kwargs):
    import torch
    import transformers

    classes = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral",
               "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe"}
    name = classes[arch if arch in classes else arch.split("_")[0]]
    config_cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name}ForCausalLM")
    config = config_cls(**{**TINY, **{**ARCHS, **MORE}[arch]})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # weights large enough that logits are far from uniform
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(folder, **save_kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return folder


CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A byte-level BPE of 300 tokens (256 bytes, 3 specials, 41 merges) with a ChatML template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "naïve café"] * 20
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=2,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", chat_template=CHATML)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch, **save_pretrained kwargs) -> folder, each built once per run."""
    built = {}

    def get(arch, **save_kwargs):
        key = (arch, tuple(sorted(save_kwargs.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(arch)
            built[key] = str(build_hf_model(arch, folder, **save_kwargs))
        return built[key]

    return get


@pytest.fixture(scope="session")
def smollm2():
    from mpinfer.fetch import fetch_smollm2

    return fetch_smollm2()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2):
    """transformers' own model and tokenizer for the same GGUF file (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(smollm2)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def hf_logits(model, ids):
    """transformers' logits (T, V) for one sequence, no cache."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids, n):
    """n greedy tokens from transformers, recomputing the whole sequence each step."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(hf_logits(model, ids)[-1])))
    return ids[-n:]


def caches(model, n=1, tokens=1024):
    """n empty sequences sharing a KV pool with room for `tokens` tokens in all."""
    from mpinfer.kvcache import PagedKVCache

    cfg = model.config
    pool = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks=-(-tokens // 16))
    return [pool.sequence() for _ in range(n)]


def greedy(model, ids, n, stop_ids=()):
    """n greedy tokens from our model (fewer when a stop id comes), prefill then decode."""
    [cache] = caches(model, tokens=len(ids) + n)
    logits = model.forward(ids, [cache], [len(ids)])
    out = []
    while len(out) < n:
        out.append(int(np.argmax(logits[0])))
        if out[-1] in stop_ids:
            break
        logits = model.forward([out[-1]], [cache], [1])
    return out


def rel_err(ours, ref):
    """max |ours - ref| / max |ref|: logits compared on the scale of the reference."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
