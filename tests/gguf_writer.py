"""Test helper: write a Hugging Face llama or Mixtral folder as a llama.cpp-style GGUF (the
converter's tensor names, its Q/K row permutation, Llama-3 rope_freqs, Mixtral's experts
stacked into one 3-D tensor per projection), quantized with gguf.quants."""

import json
import math
import os
import re

import gguf
import numpy as np
from safetensors.numpy import load_file

F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "block_sparse_moe.gate": "ffn_gate_inp"}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_EXPERT_NAMES = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}


def permute(w, heads):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope, head_dim):
    """llama.cpp's converter: per-frequency divisors written as the rope_freqs tensor."""
    base, factor = rope["rope_theta"], rope["factor"]
    old, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def stored(t, qtype):
    """(data, type) of a weight t as llama.cpp's converter stores it in qtype: norms (1-D)
    stay float32; rows that do not split into qtype's blocks fall back to F16."""
    if qtype == F32 or t.ndim == 1:
        return t, F32
    if t.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = F16
    return gguf.quants.quantize(t, qtype), qtype


def gguf_tensors(folder, cfg, stacked=True):
    """{GGUF name: float32 array} of a Hugging Face folder. Mixtral's experts are stacked per
    layer and projection, (E, out, in), as the converter writes them since 2024; stacked=False
    writes the older per-expert 2-D tensors 'blk.N.ffn_gate.E.weight'."""
    out, experts = {}, {}
    for name, t in load_file(os.path.join(folder, "model.safetensors")).items():
        t = t.astype(np.float32)
        if name.endswith("q_proj.weight"):
            t = permute(t, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            t = permute(t, cfg["num_key_value_heads"])
        if m := _EXPERT.fullmatch(name):
            layer, e, w = m.groups()
            experts.setdefault(f"blk.{layer}.{_EXPERT_NAMES[w]}", {})[int(e)] = t
        elif name == "model.embed_tokens.weight":
            out["token_embd.weight"] = t
        elif name == "model.norm.weight":
            out["output_norm.weight"] = t
        elif name == "lm_head.weight":
            out["output.weight"] = t
        else:
            layer, rest = name.split(".", 3)[2:]
            module, kind = rest.rsplit(".", 1)
            out[f"blk.{layer}.{_NAMES[module]}.{kind}"] = t
    for stem, per_expert in experts.items():
        if stacked:
            out[f"{stem}_exps.weight"] = np.stack([per_expert[e] for e in range(len(per_expert))])
        else:
            out.update({f"{stem}.{e}.weight": t for e, t in per_expert.items()})
    return out


def add_vocab(w, folder):
    """The folder's byte-level BPE (tokenizer.json) and chat template as llama.cpp's converter
    writes a "gpt2" vocabulary: tokens in id order, special tokens as control tokens."""
    spec = json.load(open(os.path.join(folder, "tokenizer.json")))
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    config = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(vocab[config["bos_token"]])
    w.add_eos_token_id(vocab[config["eos_token"]])
    template = os.path.join(folder, "chat_template.jinja")
    w.add_chat_template(config.get("chat_template") or open(template).read())


def write_gguf(folder, path, qtype=F32, stacked=True, replace=None, vocab=False):
    """replace: {GGUF name: array} written instead of (or besides) the converted tensors;
    vocab: also write the folder's tokenizer (add_vocab)."""
    cfg = json.load(open(os.path.join(folder, "config.json")))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if "num_local_experts" in cfg:  # Mixtral
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if vocab:
        add_vocab(w, folder)
    if cfg["rope_parameters"].get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg["rope_parameters"], head_dim))
    tensors = {**gguf_tensors(folder, cfg, stacked), **(replace or {})}
    for name, t in tensors.items():
        # llama.cpp keeps the router in float32: quantizing it would change which experts run
        data, kind = stored(t, F32 if name.endswith("ffn_gate_inp.weight") else qtype)
        w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
