"""Tokenizers and chat templates.

A Hugging Face folder brings `tokenizer.json` (read by the `tokenizers` library) and a chat
template in `tokenizer_config.json` or `chat_template.jinja`. A GGUF file brings its vocabulary
and merges as metadata; the byte-level BPE ("gpt2") kind is rebuilt here as a `tokenizers`
tokenizer the way transformers rebuilds it. Chat templates render with jinja2 in a sandbox
configured as transformers configures it, so prompts match token for token.
"""

import json
import os
from datetime import datetime
from functools import lru_cache

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from .errors import UserError, one_line

# llama.cpp's pre-tokenizer names whose split regex differs from GPT-2's (Llama 3 family).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types


class Tokenizer:
    def __init__(self, backend, chat_template, special_tokens, source):
        self.backend = backend  # tokenizers.Tokenizer
        self.chat_template = chat_template  # jinja2 source or None
        self.special_tokens = special_tokens  # {"bos_token": "<s>", "eos_token": ...}: template variables
        self.source = source  # the file it came from, for error messages

    def encode(self, text):
        """Token ids of plain text, with the special tokens the tokenizer adds (e.g. BOS)."""
        return self.backend.encode(text).ids

    def encode_batch(self, texts):
        """encode() of many texts at once (the tokenizers library spreads them over cores)."""
        return [e.ids for e in self.backend.encode_batch(texts)]

    def decode(self, ids, skip_special_tokens=True):
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages, add_generation_prompt=True):
        if not self.chat_template:
            raise UserError(f"{self.source}: the model has no chat template; give a 'prompt' instead of 'messages'")
        try:
            return _compile(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except Exception as e:  # jinja2 TemplateError, or a template's own raise_exception
            raise UserError(f"{self.source}: chat template failed: {e}") from None

    def encode_chat(self, messages, add_generation_prompt=True):
        """Token ids of a rendered conversation. The template writes any BOS itself, so no
        special tokens are added (as transformers' apply_chat_template)."""
        text = self.render_chat(messages, add_generation_prompt)
        return self.backend.encode(text, add_special_tokens=False).ids


@lru_cache(maxsize=8)
def _compile(source):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat templates do not expect
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None


def load_tokenizer(model_path, checkpoint):
    """The tokenizer of a model: from the GGUF metadata, or from the Hugging Face folder."""
    if hasattr(checkpoint, "meta"):
        return gguf_tokenizer(checkpoint.meta, model_path)
    return hf_tokenizer(model_path)


def hf_tokenizer(folder):
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no tokenizer.json")
    try:
        backend = HFTokenizer.from_file(path)
    except Exception as e:
        raise UserError(f"{path}: not a valid tokenizer file ({one_line(e)})") from None
    config = {}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{config_path}: not a readable JSON file ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    template_path = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.isfile(template_path):
        with open(template_path, encoding="utf-8") as f:
            template = f.read()
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        special[key] = value.get("content") if isinstance(value, dict) else value
    return Tokenizer(backend, template, special, path)


def gguf_tokenizer(meta, path):
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"{path}: unsupported GGUF tokenizer {kind!r} (supported: gpt2, byte-level BPE)")
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens or ())
    merges = meta.get("tokenizer.ggml.merges", [])
    for key, value, kind in (("tokens", tokens, str), ("token_type", types, int), ("merges", merges, str)):
        if not (isinstance(value, list) and all(type(v) is kind for v in value)):
            raise UserError(f"{path}: tokenizer.ggml.{key}: expected a list of {kind.__name__}, got {type(value).__name__}")
    if len(types) != len(tokens):
        raise UserError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    ids = {key: meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "unknown", "padding")}
    ids = {key: i if type(i) is int and 0 <= i < len(tokens) else None for key, i in ids.items()}  # else absent
    # GGUF spells byte-level tokens in GPT-2's printable byte alphabet already; a token with
    # any other character is respelled byte by byte into it, as transformers does.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in merges]
    bad = next((" ".join(m) for m in merges if len(m) != 2), None)
    if bad is not None:
        raise UserError(f"{path}: tokenizer.ggml.merges: {bad!r} is not two tokens separated by a space")
    backend = HFTokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = _GGUF_SPLITS.get(str(meta.get("tokenizer.ggml.pre")))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>...) are special and matched whole; a "control" token outside
    # the byte alphabet is a converter mislabel and would grow the vocabulary, so it is skipped.
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet]
    )
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
    if meta.get("tokenizer.ggml.add_bos_token") and ids["bos"] is not None:
        from tokenizers.processors import TemplateProcessing

        bos = tokens[ids["bos"]]
        backend.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids["bos"])]
        )
    special = {f"{name}_token": None if ids[key] is None else tokens[ids[key]]
               for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise UserError(f"{path}: tokenizer.chat_template: expected a string, got {type(template).__name__}")
    return Tokenizer(backend, template, special, path)


def _bytes_to_unicode():
    """GPT-2's map from each byte to a printable character (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))
