"""Model configuration: one dataclass for every supported decoder, read from a Hugging Face
`config.json` or from GGUF metadata.

The architectures differ only in options of the one model (see model.py):
  llama    optional Llama-3 / linear RoPE scaling, optional attention and MLP biases
  mistral  llama + sliding-window attention
  qwen2    llama + bias on q/k/v, sliding window on some layers when configured
  qwen3    llama + per-head RMSNorm on q and k, head_dim independent of hidden_size
  mixtral, qwen2_moe, qwen3_moe   mistral, qwen2, qwen3 with routed experts in place of the
           MLP (layers.MoE); Qwen2-MoE adds a sigmoid-gated shared expert
"""

import dataclasses
import json
import os

from .errors import UserError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
FAMILY = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}  # the dense model an MoE extends
ROPE_TYPES = ("default", "linear", "llama3")
_MAX = 2**31  # sizes and counts stay below: a corrupted header must not ask for a huge allocation


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float
    type: str = "default"  # one of ROPE_TYPES, or "gguf_freqs": divisors from a rope_freqs tensor
    factor: float = 1.0  # linear and llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int = 8192  # llama3


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope: RopeConfig
    max_position: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # per layer: attention window in tokens (a query sees keys with q_pos - k_pos < window), 0 = full
    sliding_windows: tuple = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    # Mixture of experts (layers.MoE): 0 experts = a dense MLP in every layer
    num_experts: int = 0
    experts_per_token: int = 0
    expert_size: int = 0  # intermediate size of one expert
    norm_topk_prob: bool = True  # renormalise the chosen experts' probabilities to sum 1
    shared_expert_size: int = 0  # Qwen2-MoE's shared expert, 0 = none
    moe_layers: tuple = ()  # per layer: True where the MLP is the MoE block

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def load_hf_config(folder):
    """ModelConfig from a Hugging Face model folder's config.json."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no config.json (expected a Hugging Face model folder or a .gguf file)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    try:
        return _hf_config(raw, path)
    except KeyError as e:
        raise UserError(f"{path}: missing key {e}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise UserError(f"{path}: invalid value ({e})") from None


def _count(path, key, value, least=1):
    """A size or count of the model (int() of it) from `least` to 2**31 - 1, else a UserError naming the key."""
    n = int(value)
    if not least <= n < _MAX:
        raise UserError(f"{path}: {key} = {n} is out of range (expected {least} to 2**31 - 1)")
    return n


def _hf_config(raw, path):
    arch = raw.get("model_type")
    if arch not in SUPPORTED:
        raise UserError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED)})")

    def need(key):
        if raw.get(key) is None:
            raise KeyError(key)
        return _count(path, key, raw[key])

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    layers = need("num_hidden_layers")
    kv_heads = _count(path, "num_key_value_heads", raw.get("num_key_value_heads") or heads)
    head_dim = _count(path, "head_dim", raw.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise UserError(f"{path}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    attention_bias = bool(raw.get("attention_bias", False))
    eos = raw.get("eos_token_id")
    family = FAMILY.get(arch, arch)
    return ModelConfig(
        arch=arch,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=_hf_rope(raw, path),
        max_position=_count(path, "max_position_embeddings", raw.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=family != "qwen2" and attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        sliding_windows=_hf_windows(raw, family, layers),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        **_hf_moe(raw, arch, layers, path),
    )


def _hf_moe(raw, arch, layers, path):
    """The MoE fields of ModelConfig, as each architecture's transformers class reads them."""
    def count(key, least=1):
        return _count(path, key, raw[key], least)

    if arch == "mixtral":
        return dict(num_experts=count("num_local_experts"), experts_per_token=count("num_experts_per_tok"),
                    expert_size=count("intermediate_size"), norm_topk_prob=True, moe_layers=(True,) * layers)
    if arch in ("qwen2_moe", "qwen3_moe"):
        # real checkpoints say num_experts; transformers 5 writes num_local_experts for Qwen3-MoE
        experts = count("num_experts" if "num_experts" in raw else "num_local_experts", 0)
        step = _count(path, "decoder_sparse_step", raw.get("decoder_sparse_step", 1))
        dense = raw.get("mlp_only_layers") or []
        shared = _count(path, "shared_expert_intermediate_size", raw.get("shared_expert_intermediate_size") or 0, 0)
        return dict(num_experts=experts, experts_per_token=count("num_experts_per_tok"),
                    expert_size=count("moe_intermediate_size"), norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
                    shared_expert_size=shared if arch == "qwen2_moe" else 0,
                    moe_layers=tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(layers)))
    return {}


def _hf_rope(raw, path):
    # transformers 5 writes `rope_parameters` (theta inside); older checkpoints have
    # `rope_theta` beside an optional `rope_scaling`.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UserError(f"{path}: unsupported RoPE scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, type=kind, factor=float(params["factor"]))
    return RopeConfig(
        theta=theta,
        type=kind,
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position=int(params["original_max_position_embeddings"]),
    )


def _hf_windows(raw, arch, layers):
    window = raw.get("sliding_window")
    if arch == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    if not window:
        return (0,) * layers
    types = raw.get("layer_types")
    if types is None:
        # Mistral slides on every layer; Qwen slides from layer `max_window_layers` on.
        first = int(raw.get("max_window_layers", 0)) if arch.startswith("qwen") else 0
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types)


def gguf_config(meta, path, tie_embeddings, has_rope_freqs):
    """ModelConfig from GGUF metadata (a dict of key -> Python value).

    Only the llama architecture of llama.cpp is read (SmolLM2, Llama, Mistral GGUFs, and
    Mixtral: llama with llama.expert_count > 0, every layer's MLP the routed experts).
    Llama-3 RoPE scaling travels in GGUF as a `rope_freqs` tensor of per-frequency divisors,
    so has_rope_freqs tells the model to read it; linear scaling travels as metadata.
    A GGUF without an output tensor ties the LM head to the embedding (tie_embeddings).
    """
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")
    try:
        return _gguf_config(meta, path, tie_embeddings, has_rope_freqs)
    except KeyError as e:
        raise UserError(f"{path}: missing GGUF metadata key {e}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise UserError(f"{path}: invalid GGUF metadata value ({e})") from None


def _gguf_config(meta, path, tie_embeddings, has_rope_freqs):
    def need(key, least=1):
        return _count(path, f"llama.{key}", meta[f"llama.{key}"], least)

    def get(key, default, least=1):
        return _count(path, f"llama.{key}", meta.get(f"llama.{key}", default), least)

    hidden, heads = need("embedding_length"), need("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    if heads % kv_heads:
        raise UserError(f"{path}: llama.attention.head_count {heads} is not a multiple of "
                        f"llama.attention.head_count_kv {kv_heads}")
    head_dim = get("rope.dimension_count", hidden // heads)
    layers = need("block_count")
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    scaling = meta.get("llama.rope.scaling.type", "none")
    if has_rope_freqs:
        rope = RopeConfig(theta=theta, type="gguf_freqs")
    elif scaling == "linear":
        rope = RopeConfig(theta=theta, type="linear", factor=float(meta["llama.rope.scaling.factor"]))
    elif scaling == "none":
        rope = RopeConfig(theta=theta)
    else:
        raise UserError(f"{path}: unsupported RoPE scaling type {scaling!r} in GGUF metadata")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", len(tokens) if isinstance(tokens, list) else 0, 0)
    if vocab == 0:
        raise UserError(f"{path}: GGUF metadata gives no vocabulary size")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    experts = get("expert_count", 0, 0)
    # Mixtral: each expert has the MLP's size; the chosen experts' probabilities renormalised
    moe = dict(num_experts=experts, experts_per_token=need("expert_used_count"),
               expert_size=need("feed_forward_length"), norm_topk_prob=True,
               moe_layers=(True,) * layers) if experts else {}
    return ModelConfig(
        arch="mixtral" if experts else "llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope=rope,
        max_position=get("context_length", 4096),
        tie_embeddings=tie_embeddings,
        sliding_windows=(0,) * layers,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        **moe,
    )
