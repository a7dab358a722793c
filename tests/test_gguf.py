"""GGUF models against transformers: tiny llama GGUFs in each quantization type the `gguf`
library writes (transformers dequantizes with its own code), Llama-3 RoPE through rope_freqs,
and the real SmolLM2-135M-Instruct Q4_1 GGUF: token ids of the chat prompt and the answer."""

import os

import gguf
import numpy as np
import pytest
from conftest import caches, greedy, hf_greedy, hf_logits, rel_err
from gguf_writer import write_gguf

from mpinfer.backend import get_backend
from mpinfer.model import Decoder
from mpinfer.tokenizer import load_tokenizer
from mpinfer.weights import open_checkpoint

IDS = list(range(7, 300, 13))


def logits(model, ids):
    return model.forward(ids, caches(model), [len(ids)], all_logits=True)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_gguf_matches_transformers(qtype, tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path = write_gguf(tiny_model("llama_gguf"), str(tmp_path / "m.gguf"), gguf.GGMLQuantizationType[qtype])
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ours = Decoder.load(path)
    assert ours.config.tie_embeddings  # no output.weight in the file
    err = rel_err(logits(ours, IDS), hf_logits(ref, IDS))
    print(f"{qtype}: max rel err {err:.2e}")
    assert err <= 1e-4
    assert greedy(ours, IDS, 32) == hf_greedy(ref, IDS, 32)


def test_llama3_rope_freqs_gguf_matches_transformers_safetensors(tiny_model, tmp_path):
    """llama.cpp stores Llama-3 RoPE scaling as a rope_freqs tensor; the GGUF model must match
    transformers running the original safetensors checkpoint with rope_type llama3."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model("llama")
    ours = Decoder.load(write_gguf(folder, str(tmp_path / "m.gguf")))
    assert ours.config.rope.type == "gguf_freqs"
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = [int(x) for x in np.random.default_rng(2).integers(0, 300, 60)]
    assert rel_err(logits(ours, ids), hf_logits(ref, ids)) <= 1e-4


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_answers_like_transformers(smollm2, hf_smollm2):
    ref, ref_tok = hf_smollm2
    ckpt = open_checkpoint(smollm2)
    tok = load_tokenizer(smollm2, ckpt)
    model = Decoder(ckpt, get_backend("numpy"))
    ids = tok.encode_chat(CHAT)
    assert ids == list(ref_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"])
    err = rel_err(logits(model, ids), hf_logits(ref, ids))
    print(f"SmolLM2 chat prompt: max rel err {err:.2e}")
    assert err <= 1e-4
    answer = greedy(model, ids, 16, stop_ids=(2,))
    assert answer == hf_greedy(ref, ids, len(answer))
    assert tok.decode(answer) == "The capital of France is Paris."
    assert answer[-1] == 2  # <|im_end|>


STRINGS = ["Hello world", "  two leading spaces", "naïve café — Zürich", "東京タワーと日本語", "emoji 🚀🤖 done",
           "digits 12345 and 3.14159", "tabs\tand\nnewlines\r\n", "<|im_start|>user\nhi<|im_end|>", "", "x" * 50]


def test_smollm2_tokenizer_matches_transformers(smollm2, hf_smollm2):
    _, ref_tok = hf_smollm2
    tok = load_tokenizer(smollm2, open_checkpoint(smollm2))
    for text in STRINGS:
        ids = tok.encode(text)
        assert ids == ref_tok(text)["input_ids"], text
        assert tok.decode(ids) == ref_tok.decode(ids, skip_special_tokens=True), text


def test_smollm2_chat_template_matches_transformers(smollm2, hf_smollm2):
    _, ref_tok = hf_smollm2
    tok = load_tokenizer(smollm2, open_checkpoint(smollm2))
    chats = [CHAT, [{"role": "system", "content": "Be brief."}, *CHAT],
             [*CHAT, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Und Deutschland?"}]]
    for chat in chats:
        for gen in (True, False):
            assert tok.render_chat(chat, gen) == ref_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)


def test_smollm2_config(smollm2):
    cfg = open_checkpoint(smollm2).config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope.theta, cfg.tie_embeddings) == (1536, 49152, 100000.0, True)
    assert os.path.getsize(smollm2) == 98_362_432


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"])
def test_whole_range_dequantize_equals_the_library(qtype):
    """K-quants (which gguf-py cannot write) dequantize through the same whole-range path as
    the other types; it must equal gguf.quants.dequantize, for all rows and for a row range."""
    from mpinfer.gguf_file import _dequantize

    kind = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (6, 2 * size), dtype=np.uint8)  # 6 rows of 2 blocks
    data &= 0x3B  # clears bit 14 of every 16-bit word: fp16 scales stay finite
    expected = gguf.quants.dequantize(data, kind)
    assert expected.shape == (6, 2 * block) and np.isfinite(expected).all()
    np.testing.assert_array_equal(_dequantize(data, kind), expected)
    np.testing.assert_array_equal(_dequantize(data[2:5], kind), expected[2:5])


def test_quantized_blocks_as_a_backend_keeps_them(tiny_model, tmp_path):
    """ckpt.get(..., keep=formats) hands out the raw blocks of a tensor stored in one of them:
    row slices (Q's permuted rows put back in order, whole rows of blocks), column slices of
    whole 32-blocks; a column slice inside a block, or a format not kept, gives float32. The
    blocks' values are exactly the float32 the NumPy backend reads."""
    from mpinfer.quant import QuantTensor, concat

    path = write_gguf(tiny_model("llama_gguf"), str(tmp_path / "m.gguf"), gguf.GGMLQuantizationType.Q4_1)
    ckpt = open_checkpoint(path)
    q, o = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    full_q, full_o = ckpt.get(q, (96, 96)), ckpt.get(o, (96, 96))
    blocks = ckpt.get(q, (96, 96), rows=slice(16, 64), keep=("q4_1",))
    assert isinstance(blocks, QuantTensor) and blocks.fmt == "q4_1" and blocks.data.shape == (48, 3 * 20)
    np.testing.assert_array_equal(blocks.dequantize(), full_q[16:64])
    cols = ckpt.get(o, (96, 96), cols=slice(32, 96), keep=("q4_1",))
    assert isinstance(cols, QuantTensor) and cols.shape == (96, 64)
    np.testing.assert_array_equal(cols.dequantize(), full_o[:, 32:])
    for kept, cut in [(("q4_1",), slice(48, 96)), (("q8_0",), None)]:
        got = ckpt.get(o, (96, 96), cols=cut, keep=kept)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_array_equal(got, full_o[:, cut or slice(None)])
    # fused parts: one format stays blocks; a mix falls back to float32
    assert isinstance(concat([blocks, blocks]), QuantTensor)
    q8 = QuantTensor("q8_0", gguf.quants.quantize(full_o, gguf.GGMLQuantizationType.Q8_0))
    mixed = concat([blocks, q8])
    np.testing.assert_array_equal(mixed, np.concatenate([full_q[16:64], q8.dequantize()]))
