"""Every architecture against Hugging Face transformers (float32, CPU) on tiny random models:
logits of prefill, chunked prefill and decode steps, and 32 greedy tokens."""

import numpy as np
import pytest
from conftest import ARCHS, caches, greedy, hf_greedy, hf_logits, rel_err

from mpinfer.model import Decoder

PROMPTS = [[5, 17, 250, 3], list(range(7, 300, 13)), [int(x) for x in np.random.default_rng(1).integers(0, 300, 40)]]


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def our_logits(model, ids, chunks):
    """Logits (T, V) of one sequence fed in chunks of the given sizes through one cache."""
    (cache,), out, start = caches(model), [], 0
    for n in chunks:
        out.append(model.forward(ids[start : start + n], [cache], [n], all_logits=True))
        start += n
    return np.concatenate(out)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_and_greedy_match_transformers(arch, tiny_model):
    folder = tiny_model(arch)
    ours, ref = Decoder.load(folder), hf_model(folder)
    for ids in PROMPTS:
        expected = hf_logits(ref, ids)
        T = len(ids)
        for chunks in ([T], [T // 2, T - T // 2], [1] * T):  # prefill, chunked prefill, decode steps
            err = rel_err(our_logits(ours, ids, chunks), expected)
            print(f"{arch} T={T} chunks={len(chunks)}: max rel err {err:.2e}")
            assert err <= 1e-4
        assert greedy(ours, ids, 32) == hf_greedy(ref, ids, 32)


def test_batched_sequences_match_one_at_a_time(tiny_model):
    """Sequences sharing a forward pass (prefill of one, decode of another) do not mix."""
    model = Decoder.load(tiny_model("qwen2"))
    a, b = PROMPTS[2], PROMPTS[1]
    alone_a, alone_b = our_logits(model, a, [len(a)]), our_logits(model, b, [len(b)])
    ca, cb = caches(model, 2)
    model.forward(a[:30], [ca], [30])
    both = model.forward(a[30:] + b, [ca, cb], [len(a) - 30, len(b)], all_logits=True)
    assert rel_err(both[: len(a) - 30], alone_a[30:]) < 1e-5
    assert rel_err(both[len(a) - 30 :], alone_b) < 1e-5


def test_sharded_checkpoint(tiny_model):
    import os

    folder = tiny_model("llama", max_shard_size="40KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 3
    ids = PROMPTS[1]
    assert rel_err(our_logits(Decoder.load(folder), ids, [len(ids)]), hf_logits(hf_model(folder), ids)) <= 1e-4


def test_bfloat16_checkpoint(tmp_path):
    """bf16 weights (numpy has no bf16) widen exactly to float32, as transformers does."""
    import torch
    from conftest import build_hf_model
    from transformers import AutoModelForCausalLM

    folder = build_hf_model("qwen3", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    ids = PROMPTS[1]
    assert rel_err(our_logits(Decoder.load(str(tmp_path / "bf16")), ids, [len(ids)]), hf_logits(ref, ids)) <= 1e-4


def test_rows_slice_reads_only_that_part(tiny_model):
    from mpinfer.weights import open_checkpoint

    ckpt = open_checkpoint(tiny_model("llama"))
    name = "model.layers.1.mlp.up_proj.weight"
    full = ckpt.get(name, (136, 96))
    np.testing.assert_array_equal(ckpt.get(name, (136, 96), rows=slice(34, 68)), full[34:68])


def test_tokenizer_json_and_chat_template_match_transformers(tiny_model):
    from transformers import AutoTokenizer

    from mpinfer.tokenizer import hf_tokenizer

    folder = tiny_model("qwen3")
    ours, ref = hf_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for text in ["the quick brown fox", "naïve café ☕", "<|im_start|>user hi<|im_end|>", "  x\ty\n"]:
        assert ours.encode(text) == ref(text)["input_ids"], text
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    for gen in (True, False):
        expected = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)["input_ids"]
        assert ours.encode_chat(chat, gen) == list(expected)
