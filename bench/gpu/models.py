"""Random-weight Llama-architecture checkpoints made where they are used (the GPU machine
receives at most 64 MiB, so SmolLM2's 98 MB cannot travel): a Hugging Face folder with
config.json, model.safetensors in bf16 and a word-level tokenizer of the full vocabulary.

Weights are scaled so that logits spread over several units (greedy choices are not
coin flips between near-equal candidates) while activations stay O(1).
"""

import json
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
