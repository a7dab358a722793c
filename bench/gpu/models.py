"""Random-weight Llama-architecture checkpoints made where they are used (the GPU machine
receives at most 64 MiB, so SmolLM2's 98 MB cannot travel): a Hugging Face folder with
config.json, model.safetensors in bf16 and a word-level tokenizer of the full vocabulary;
or a GGUF file quantized as llama.cpp stores SmolLM2 (write_gguf).

Weights are scaled so that logits spread over several units (greedy choices are not
coin flips between near-equal candidates) while activations stay O(1).
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               num_hidden_layers=30, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 num_hidden_layers=32, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False)

# a model TP 2 can split (SmolLM2's 9 heads cannot be), head dim 64
TP2 = dict(SMOLLM2, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=8)


def write_model(folder, dims, seed=0, device="cpu"):
    """A checkpoint with the dimensions dims (SMOLLM2, LLAMA3_8B, or fewer layers of one);
    device: where the random numbers are drawn (an 8B-shaped model's billions: "cuda")."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device).manual_seed(seed)
    D, I, V = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    Dh = D // dims["num_attention_heads"]
    H, Hkv = dims["num_attention_heads"], dims["num_key_value_heads"]

    def rand(*shape, std):
        return (torch.randn(*shape, generator=g, device=device) * std).to(torch.bfloat16).cpu()

    embed_std = 3.0 / np.sqrt(D)  # logits = normed h . e: std about 3
    tensors = {"model.embed_tokens.weight": rand(V, D, std=embed_std),
               "model.norm.weight": (1.0 + rand(D, std=0.1).float()).bfloat16()}
    if not dims["tie_word_embeddings"]:
        tensors["lm_head.weight"] = rand(V, D, std=embed_std)
    for i in range(dims["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name, shape in [("self_attn.q_proj", (H * Dh, D)), ("self_attn.k_proj", (Hkv * Dh, D)),
                            ("self_attn.v_proj", (Hkv * Dh, D)), ("self_attn.o_proj", (D, H * Dh)),
                            ("mlp.gate_proj", (I, D)), ("mlp.up_proj", (I, D)), ("mlp.down_proj", (D, I))]:
            tensors[f"{p}.{name}.weight"] = rand(*shape, std=1.0 / np.sqrt(shape[1]))
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}.{name}.weight"] = (1.0 + rand(D, std=0.1).float()).bfloat16()
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
              "max_position_embeddings": 8192, "hidden_act": "silu", "torch_dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2, **dims}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(folder, V)
    return folder


def write_tokenizer(folder, vocab_size):
    """A word-level tokenizer: token i is the word "w{i}"; ids 0..2 are specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {f"w{i}": i for i in range(vocab_size)}
    vocab["<unk>"], vocab["<s>"], vocab["</s>"] = 0, 1, 2
    del vocab["w0"], vocab["w1"], vocab["w2"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(Path(folder) / "tokenizer.json"))
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))


def write_gguf(path, dims, qtype="Q4_1", seed=0):
    """A llama GGUF with the dimensions dims, random weights scaled as write_model's: every
    linear quantized qtype by gguf.quants, the embedding Q8_0 and the norms F32, as in
    SmolLM2-135M-Instruct.Q4_1.gguf (tied head: no output.weight). No tokenizer (e2e feeds
    token ids); Q/K rows are random, so llama.cpp's row permutation is left out."""
    import gguf

    rng = np.random.default_rng(seed)
    D, I, V = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    H, Hkv = dims["num_attention_heads"], dims["num_key_value_heads"]
    Dh = D // H
    kind, q8 = gguf.GGMLQuantizationType[qtype], gguf.GGMLQuantizationType.Q8_0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(w.add_block_count, dims["num_hidden_layers"]), (w.add_context_length, 8192),
                       (w.add_embedding_length, D), (w.add_feed_forward_length, I), (w.add_head_count, H),
                       (w.add_head_count_kv, Hkv), (w.add_rope_dimension_count, Dh),
                       (w.add_rope_freq_base, dims["rope_theta"]), (w.add_layer_norm_rms_eps, 1e-5),
                       (w.add_vocab_size, V)]:
        add(value)

    def rand(shape, std):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def quantized(t, qt):
        """gguf.quants.quantize over row ranges in threads (its numpy work releases the GIL)."""
        step = -(-len(t) // (os.cpu_count() or 1))
        with ThreadPoolExecutor() as pool:
            parts = pool.map(lambda r: gguf.quants.quantize(t[r:r + step], qt), range(0, len(t), step))
            return np.concatenate(list(parts)), qt

    tensors = {"token_embd.weight": quantized(rand((V, D), 3.0 / np.sqrt(D)), q8),
               "output_norm.weight": (1.0 + rand(D, 0.1), gguf.GGMLQuantizationType.F32)}
    for i in range(dims["num_hidden_layers"]):
        for name, shape in [("attn_q", (H * Dh, D)), ("attn_k", (Hkv * Dh, D)), ("attn_v", (Hkv * Dh, D)),
                            ("attn_output", (D, H * Dh)), ("ffn_gate", (I, D)), ("ffn_up", (I, D)),
                            ("ffn_down", (D, I))]:
            tensors[f"blk.{i}.{name}.weight"] = quantized(rand(shape, 1.0 / np.sqrt(shape[1])), kind)
        for name in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{i}.{name}.weight"] = (1.0 + rand(D, 0.1), gguf.GGMLQuantizationType.F32)
    for name, (data, qt) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
