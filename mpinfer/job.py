"""The job file (TOML, DESIGN.md section 1) and its `--set section.key=value` overrides.

A relative path in the job file is relative to the job file's folder, so a job folder can be
moved whole; a relative path given with --set is relative to the current directory, as any
path typed on a command line. A leading ~ is the home folder. A --set value is read as a
TOML value (7, 0.5, ["\\n"], "x") and, when it is not one, as a plain string, so
--set model.path=/a/b.gguf needs no quotes.
"""

import dataclasses
import json
import os
import re
import tomllib

from .params import SamplingParams, checked, show
from .errors import UserError, one_line

BACKENDS = ("auto", "numpy", "cuda")
CP_METHODS = ("ring", "ulysses")


@dataclasses.dataclass(frozen=True)
class Parallel:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    micro_batches: int = 0  # requests groups in flight through a pipeline; 0 = pp
    cp_method: str = "ring"  # how a long prompt's attention runs over the CP group: ring | ulysses
    cp_threshold: int = 1024  # prompts of at least this many tokens go through the CP group
    sp: bool = False  # sequence parallelism inside the TP group: norms and residuals on 1/tp of the tokens
    auto: bool = False  # the planner (planner.py) chooses tp, pp, ep and cp for the world the job runs on


@dataclasses.dataclass(frozen=True)
class Engine:
    backend: str = "auto"  # one of BACKENDS; auto = cuda when a GPU is usable
    max_batch_tokens: int = 512  # token budget of one engine step (prefill chunks + decodes)
    max_seqs: int = 128  # requests running at once on one replica
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_gb: float = 1.0  # GiB of KV cache per replica
    flush_seconds: float = 5.0  # finished requests reach the results file at least this often
    cuda_graphs: bool = True  # on GPUs, decode steps replay a CUDA graph where they can (backend/cuda_graphs.py)


@dataclasses.dataclass(frozen=True)
class Moe:
    capacity_factor: float = 0.0  # pairs an expert takes per step: factor * top_k * tokens / experts; 0 = no cap
    hot_experts: int = 0  # per MoE layer, one more copy of this many of the most loaded experts; 0 = none
    load_from: str = ""  # absolute path of an earlier results file whose /moe/expert_load places the copies;
                         # "" = a routing pass over the job's first ROUTING_PROMPTS prompts


@dataclasses.dataclass(frozen=True)
class Shard:
    """Task `index` of `count` of a job split over a job array (input.shard = "index/count").
    It runs the prompt lines whose 0-based number % count == index (round robin, so a file
    sorted by length or source still gives every task the same mix of work) and writes its
    own results file next to the job's output; `mpinfer merge` joins the files."""
    index: int
    count: int
    job_output: str  # the job's [output] path (absolute), where the merge writes

    @property
    def path(self):
        """This shard's results file: results.h5 -> results.shard-0-of-4.h5."""
        stem, ext = os.path.splitext(self.job_output)
        return f"{stem}.shard-{self.index}-of-{self.count}{ext}"

    def takes(self, index):
        return index % self.count == self.index

    def __str__(self):
        return f"{self.index}/{self.count}"


# key: (type, test, what the test asks), as in sampling.py
_AT_LEAST_1 = (int, lambda v: v >= 1, "must be >= 1")
_PARALLEL_RULES = {"tp": _AT_LEAST_1, "pp": _AT_LEAST_1, "ep": _AT_LEAST_1, "cp": _AT_LEAST_1,
                   "micro_batches": (int, lambda v: v >= 0, "must be >= 0 (0: as many as pipeline stages)"),
                   "cp_method": (str, lambda v: v in CP_METHODS, f"must be one of {', '.join(CP_METHODS)}"),
                   "cp_threshold": _AT_LEAST_1,
                   "sp": (bool, lambda v: True, ""),
                   "auto": (bool, lambda v: True, "")}
_ENGINE_RULES = {
    "backend": (str, lambda v: v in BACKENDS, f"must be one of {', '.join(BACKENDS)}"),
    "max_batch_tokens": (int, lambda v: v >= 16, "must be >= 16"),
    "max_seqs": _AT_LEAST_1,
    "block_size": (int, lambda v: v in [2**i for i in range(9)], "must be a power of two from 1 to 256"),
    "kv_cache_gb": (float, lambda v: v > 0, "must be > 0"),
    "flush_seconds": (float, lambda v: v > 0, "must be > 0"),
    "cuda_graphs": (bool, lambda v: True, ""),
}
_MOE_RULES = {
    "capacity_factor": (float, lambda v: v >= 0, "must be >= 0 (0: no capacity limit)"),
    "hot_experts": (int, lambda v: v >= 0, "must be >= 0 (0: no replication)"),
}
_PATH_RULE = (str, lambda v: v != "", "must not be empty")
SECTIONS = {
    "model": ("path",),
    "input": ("path", "shard"),
    "output": ("path",),
    "sampling": tuple(f.name for f in dataclasses.fields(SamplingParams)),
    "parallel": tuple(_PARALLEL_RULES),
    "engine": tuple(_ENGINE_RULES),
    "moe": (*_MOE_RULES, "load_from"),
}


@dataclasses.dataclass(frozen=True)
class Job:
    path: str  # the job file, as given
    model_path: str  # absolute
    input_path: str  # absolute
    output_path: str  # absolute: the results file this run writes ([output] path, or its shard's file)
    sampling: SamplingParams
    parallel: Parallel
    engine: Engine
    moe: Moe
    shard: Shard | None = None  # a job array task: its share of the prompt lines

    def toml(self):
        """The effective job as TOML: every section and key, absolute paths."""
        sections = {
            "model": {"path": self.model_path},
            "input": {"path": self.input_path, "shard": str(self.shard or "")},
            "output": {"path": self.shard.job_output if self.shard else self.output_path},
            "sampling": dataclasses.asdict(self.sampling),
            "parallel": dataclasses.asdict(self.parallel),
            "engine": dataclasses.asdict(self.engine),
            "moe": dataclasses.asdict(self.moe),
        }
        lines = []
        for name, table in sections.items():
            lines += [f"[{name}]"] + [f"{key} = {_toml_value(value)}" for key, value in table.items()] + [""]
        return "\n".join(lines)


def _toml_value(value):
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        # JSON string escapes are TOML basic-string escapes; DEL is the one control
        # character JSON leaves raw and TOML refuses
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)  # int, or float (always with a "." or an exponent, as TOML wants)


def load_job(path, overrides=()):
    """The Job of a job file with `--set` overrides ("section.key=value") applied."""
    path = os.fspath(path)
    given = _given(path, overrides)
    sampling = SamplingParams()
    for (section, key), (value, where, _) in given.items():
        if section == "sampling":
            try:
                sampling = sampling.override({key: value})
            except ValueError as e:
                raise UserError(f"{where}sampling.{e}") from None
    where, model_path = _path(path, given, "model")
    if not os.path.exists(model_path):
        raise UserError(f"{where}model.path: {model_path} does not exist")
    where, input_path = _path(path, given, "input")
    if not os.path.isfile(input_path):
        problem = "is a folder, not a file" if os.path.isdir(input_path) else "does not exist"
        raise UserError(f"{where}input.path: {input_path} {problem}")
    where, output_path = _path(path, given, "output")
    if os.path.isdir(output_path):
        raise UserError(f"{where}output.path: {output_path} is a folder, not a file")
    if not os.path.isdir(os.path.dirname(output_path)):
        raise UserError(f"{where}output.path: folder {os.path.dirname(output_path)} does not exist")
    parallel = Parallel(**_section(given, "parallel", _PARALLEL_RULES))
    engine = Engine(**_section(given, "engine", _ENGINE_RULES))
    moe = Moe(**_section(given, "moe", _MOE_RULES))
    if given.get(("moe", "load_from"), ("",))[0] != "":
        where, load_from = _path(path, given, "moe", "load_from")
        if not os.path.isfile(load_from):
            raise UserError(f"{where}moe.load_from: {load_from} does not exist")
        moe = dataclasses.replace(moe, load_from=load_from)
    shard = _shard(given, output_path)
    return Job(path, model_path, input_path, shard.path if shard else output_path, sampling, parallel, engine, moe,
               shard)


def _shard(given, output_path):
    """The Shard of input.shard = "I/N" (0 <= I < N), or None for "" or no key."""
    if ("input", "shard") not in given:
        return None
    text = _checked(given, "input", "shard", str, lambda v: True, "")
    if text == "":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        where = given["input", "shard"][1]
        raise UserError(f'{where}input.shard: expected "I/N", task I of N counted from 0 (0 <= I < N, e.g. "0/4"), '
                        f"got {show(text)}")
    return Shard(int(match[1]), int(match[2]), output_path)


def _given(path, overrides):
    """{(section, key): (value, where it was given, folder of relative paths)} from the job
    file and then the overrides, every section and key known. `where` starts the messages
    about the value: "job.toml: " or "--set "."""
    given = {}
    folder = os.path.dirname(os.path.abspath(path))
    for section, table in _read_toml(path).items():
        if section not in SECTIONS:
            raise UserError(f"{path}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise UserError(f"{path}: {section}: expected a section [{section}], got {show(table)}")
        for key, value in table.items():
            given[section, key] = (value, f"{path}: ", folder)
    for item in overrides:
        section, key, value = _parse_set(item)
        given[section, key] = (value, "--set ", os.getcwd())
    for (section, key), (_, where, _) in given.items():
        if key not in SECTIONS[section]:
            raise UserError(f"{where}{section}.{key}: unknown key (known: {', '.join(SECTIONS[section])})")
    return given


def _checked(given, section, key, kind, ok, rule):
    value, where, _ = given[section, key]
    try:
        return checked(key, value, kind, ok, rule)
    except ValueError as e:
        raise UserError(f"{where}{section}.{e}") from None


def _section(given, section, rules):
    return {key: _checked(given, section, key, *rule) for key, rule in rules.items() if (section, key) in given}


def _path(path, given, section, key="path"):
    """(where it was given, absolute path) of [section] key."""
    if (section, key) not in given:
        raise UserError(f"{path}: {section}.{key}: missing (add it under [{section}] or --set {section}.{key}=...)")
    _, where, folder = given[section, key]
    value = os.path.expanduser(_checked(given, section, key, *_PATH_RULE))
    return where, os.path.normpath(os.path.join(folder, value))


def _read_toml(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such job file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the job file ({e.strerror})") from None
    except ValueError as e:  # tomllib.TOMLDecodeError (its message has the line), or not UTF-8
        raise UserError(f"{path}: not valid TOML: {one_line(e)}") from None


def _parse_set(item):
    """("section", "key", value) of one --set argument."""
    name, equals, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not equals or not dot or not section or not key:
        raise UserError(f"--set {name.strip()}: expected section.key=value (e.g. --set parallel.tp=2)")
    if section not in SECTIONS:
        raise UserError(f"--set {section}.{key}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
    try:
        return section, key, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return section, key, text.strip()
