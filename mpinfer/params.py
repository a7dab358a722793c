"""Sampling parameters: the job's [sampling] section and a prompt line's "sampling" object,
checked key by key (the values come from TOML or JSON written by people)."""

import dataclasses
import json
import math


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop: tuple = ()  # stop strings: the text is cut before the first one
    stop_token_ids: tuple = ()  # besides the model's EOS ids
    logprobs: int = 0  # top-N logprobs kept per generated token

    @classmethod
    def from_json(cls, d):
        """From dataclasses.asdict() sent as JSON (lists back to tuples)."""
        return cls(**{**d, "stop": tuple(d["stop"]), "stop_token_ids": tuple(d["stop_token_ids"])})

    def override(self, mapping):
        """A copy with the keys of `mapping` (a TOML table or JSON object) replaced, each one
        checked. Raises ValueError naming the key; callers add the file and line."""
        changes = {}
        for key, value in mapping.items():
            if key not in _RULES:
                raise ValueError(f"unknown key '{key}' (known: {', '.join(_RULES)})")
            kind, ok, rule = _RULES[key]
            if key not in ("stop", "stop_token_ids"):
                changes[key] = checked(key, value, kind, ok, rule)
                continue
            items = [value] if key == "stop" and isinstance(value, str) else value  # one stop string
            if not isinstance(items, list):
                raise ValueError(f"{key}: expected a list, got {show(value)}")
            changes[key] = tuple(checked(key, item, kind, ok, rule) for item in items)
        return dataclasses.replace(self, **changes)


# key: (type of the value or of each list item, test, what the test asks)
_RULES = {
    "max_new_tokens": (int, lambda v: v >= 1, "must be >= 1"),
    "temperature": (float, lambda v: v >= 0, "must be >= 0"),
    "top_k": (int, lambda v: v >= 0, "must be >= 0"),
    "top_p": (float, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "min_p": (float, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "seed": (int, lambda v: 0 <= v < 2**64, "must be in [0, 2**64)"),
    "stop": (str, lambda v: v != "", "must not be an empty string"),
    "stop_token_ids": (int, lambda v: v >= 0, "must be >= 0"),
    "logprobs": (int, lambda v: 0 <= v <= 20, "must be in [0, 20]"),
}
_KINDS = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}


def checked(key, value, kind, ok, rule):
    """`value` (from TOML or JSON) as `kind` (int, float or str) passing `ok`, or a ValueError
    naming `key`. A bool is not an int (JSON and TOML keep them apart), a float is not an int,
    an int is a float. Also used by the job file's own sections."""
    if kind is float and type(value) is int:
        value = float(value) if abs(value) < 1e300 else math.inf  # float() would overflow
    if type(value) is not kind or (kind is float and not math.isfinite(value)):
        raise ValueError(f"{key}: expected {_KINDS[kind]}, got {show(value)}")
    if not ok(value):
        raise ValueError(f"{key}: {rule}, got {show(value)}")
    return value


def show(value):
    """A value as the user wrote it in TOML or JSON: "two", 1.5, inf, true, [1, 2]."""
    return repr(value) if isinstance(value, float) else json.dumps(value, ensure_ascii=False, default=str)
