"""Fuzzing the readers of untrusted files: a Hugging Face folder (safetensors weights, config.json,
tokenizer.json), a GGUF file and a prompt file.

Each case starts from a valid tiny file and applies one seeded random mutation (truncation,
byte flips, a length or count field set to a huge value, a header entry with a wrong dtype,
shape or offsets, garbage; for prompts invalid UTF-8, huge numbers, deep nesting, NUL bytes,
a line of megabytes). Reading it the way `mpinfer run` does must succeed or raise one
UserError of one line naming the file: no other exception, no crash, no hang, no huge
allocation. The cases run in a worker process (this file run as a script) with a per-case
alarm and an address-space limit, so a hang or a 2**60-byte allocation fails its case
instead of the test run. Fixed seed and case counts: the same cases every run.
"""

import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback

import pytest

SEED = 8
CASES = {"hf": 500, "gguf": 300, "prompts": 120}
CASE_SECONDS = 10  # a case taking longer is a hang
SPARE_BYTES = 2 << 30  # address space a case may add: a huge allocation fails with MemoryError
HUGE = [2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 1]  # huge, or negative read as unsigned


# ---- the test side: one worker process per reader ----

def fuzz(kind, *args):
    """Run CASES[kind] cases in a worker; returns their results, one dict per case (case,
    mutation, outcome "ok" or "error", message), after checking that no case failed otherwise."""
    cmd = [sys.executable, __file__, kind, str(SEED), str(CASES[kind]), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    last = results[-1] if results else None
    assert done.returncode == 0, f"worker died ({done.returncode}) in {last}: {done.stderr[-3000:]}"
    assert len(results) == CASES[kind], done.stderr[-3000:]
    failed = [r for r in results if r["outcome"] not in ("ok", "error")]
    assert not failed, "\n".join(f"case {r['case']} ({r['mutation']}): {r['outcome']}: {r['message']}" for r in failed)
    return results


def check_errors(results, *names):
    """Every UserError is one line and names the file it is about (one of `names`)."""
    for r in results:
        if r["outcome"] == "error":
            message = r["message"]
            assert "\n" not in message and any(name in message for name in names), r


def test_hugging_face_folder(tiny_model, tmp_path):
    results = fuzz("hf", tiny_model("llama"), tmp_path)
    check_errors(results, str(tmp_path / "model"))
    assert {r["outcome"] for r in results} == {"ok", "error"}  # the mutations are neither all harmless nor all fatal


def test_gguf_file(tiny_model, tmp_path):
    from gguf import GGMLQuantizationType as Q
    from gguf_writer import write_gguf

    folder, base = tiny_model("llama_gguf"), tmp_path / "base"
    base.mkdir()
    for qtype in (Q.F32, Q.Q8_0):
        write_gguf(folder, str(base / f"{qtype.name}.gguf"), qtype, vocab=True)
    results = fuzz("gguf", base, tmp_path)
    check_errors(results, str(tmp_path / "case.gguf"))
    assert {r["outcome"] for r in results} == {"ok", "error"}


def test_prompt_file(tiny_model, tmp_path):
    results = fuzz("prompts", tiny_model("llama"), tmp_path)
    check_errors(results, str(tmp_path / "prompts.jsonl"))
    assert {r["outcome"] for r in results} == {"ok", "error"}


def test_no_unsafe_deserialization():
    """Model and prompt files are data: nothing in mpinfer unpickles, executes or trusts code,
    and a model's chat template (jinja2, from the model's files) renders in jinja2's sandbox."""
    root = os.path.join(os.path.dirname(__file__), "..", "mpinfer")
    banned = re.compile(r"\b(import pickle|from pickle|import marshal|cPickle|dill|torch\.load|trust_remote_code"
                        r"|allow_pickle\s*=\s*True)\b|(?<![\w.])(eval|exec)\(")
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                for number, line in enumerate(open(path, encoding="utf-8"), 1):
                    if banned.search(line):
                        found.append(f"{path}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
    tokenizer = open(os.path.join(root, "tokenizer.py"), encoding="utf-8").read()
    assert "ImmutableSandboxedEnvironment(" in tokenizer and "jinja2.Environment(" not in tokenizer


# ---- mutations ----

def truncate(rng, data):
    return data[: rng.randrange(len(data))], "truncated"


def flip(rng, data, lo=0, hi=None):
    data = bytearray(data)
    hi = len(data) if hi is None else min(hi, len(data))
    where = sorted(rng.randrange(lo, hi) for _ in range(rng.randint(1, 8)))
    for i in where:
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data), f"bits flipped at {where}"


def garbage(rng, data):
    return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 8, 24, 300, 5000]))), "garbage"


def json_leaf(rng, data):
    """A random value somewhere in a JSON document replaced by one of a wrong type or size."""
    doc = json.loads(data)
    path, node = [], doc
    while isinstance(node, (dict, list)) and node and rng.random() < 0.8:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        parent, node = node, node[key]
    value = rng.choice([-1, 0, 1, 2**64, 10**30, 1e308, -1.5, "x", "", None, True, [], {}, [[1]], {"a": 1}])
    if not path:
        return json.dumps(value).encode(), f"document replaced by {value!r}"
    parent[path[-1]] = value
    return json.dumps(doc).encode(), f"{path} = {value!r}"


# safetensors: 8-byte little-endian header length, JSON header, tensor bytes

def split_safetensors(data):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header, body):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def to_bf16(data):
    """The same tensors as BF16 (the top half of each float32)."""
    import numpy as np

    header, body = split_safetensors(data)
    out, offset = bytearray(), 0
    for _, name in sorted((meta["data_offsets"][0], name) for name, meta in header.items() if name != "__metadata__"):
        meta = header[name]
        begin, end = meta["data_offsets"]
        half = (np.frombuffer(body[begin:end], np.uint32) >> 16).astype(np.uint16).tobytes()
        meta.update(dtype="BF16", data_offsets=[offset, offset + len(half)])
        out += half
        offset += len(half)
    return join_safetensors(header, bytes(out))


def safetensors_header(rng, data):
    header, body = split_safetensors(data)
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    meta = header[name]
    begin, end = meta["data_offsets"]
    choice = rng.randrange(9)
    if choice == 0:
        meta["dtype"] = rng.choice(["F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "I8", "XX", 7, None])
        what = f"dtype {meta['dtype']!r}"
    elif choice == 1:
        meta["shape"] = rng.choice([[], [0], [-1, 96], [2**40, 2**40], [2**63, 2], ["a"], [1.5], 5, [len(body) // 4]])
        what = f"shape {meta['shape']!r}"
    elif choice == 2:
        meta["data_offsets"] = rng.choice([[0, 2**64 - 1], [end, begin], [begin, len(body) + 4], [-4, end],
                                           [2**63, 2**63 + end - begin], [begin], "x"])
        what = f"data_offsets {meta['data_offsets']!r}"
    elif choice == 3:  # the same bytes as another tensor of the same size: overlapping ranges
        other = rng.choice(names)
        meta["data_offsets"] = header[other]["data_offsets"]
        what = f"data_offsets of {other}"
    elif choice == 4:
        meta["shape"] = list(reversed(meta["shape"])) + [1]
        what = "shape with a 1 appended"
    elif choice == 5:
        header[name] = rng.choice([None, [], "x", {}, {"dtype": "F32"}])
        what = f"entry {header[name]!r}"
    elif choice == 6:
        header = rng.choice([[], "x", None, {"__metadata__": {"format": "pt"}}])
        return join_safetensors(header, body), f"header {header!r}"
    elif choice == 7:
        header["__metadata__"] = rng.choice([None, [], {"format": 5}, "x"])
        what = f"__metadata__ {header['__metadata__']!r}"
    else:
        n = rng.choice(HUGE + [0, 1, len(data), len(data) - 8 + 1])
        return struct.pack("<Q", n) + data[8:], f"header length {n}"
    return join_safetensors(header, body), f"{name}: {what}"


INDEX = "model.safetensors.index.json"


def hf_case(rng, files):
    """(file name, mutated bytes, what was done) for one case on a Hugging Face folder."""
    name = rng.choices(["model.safetensors", "config.json", "tokenizer.json", INDEX], [6, 2, 2, 1])[0]
    data = files[name]
    if name == "model.safetensors":
        if rng.random() < 0.4:
            data = files["bf16"]
        mutate = rng.choices([truncate, flip, lambda r, d: flip(r, d, 0, 8 + 400), garbage, safetensors_header],
                             [2, 2, 2, 1, 6])[0]
    else:
        mutate = rng.choices([truncate, flip, garbage, json_leaf], [1, 1, 1, 3])[0]
    data, what = mutate(rng, data)
    return name, data, what


# GGUF: header, key/value metadata, tensor infos; every length and count field is found by a walk

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
STRING, ARRAY = 8, 9


def gguf_fields(data):
    """{kind: [(offset, width, what)]} of the fields of a GGUF file: "count" (lengths and counts),
    "type" (value and tensor types), "tensor" (dimensions, data offsets), "value" (scalar metadata:
    head counts, token ids...) and "key" (metadata key names)."""
    fields = {"count": [(8, 8, "tensor count"), (16, 8, "metadata count")], "type": [], "tensor": [], "value": [],
              "key": []}
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(pos, what):
        fields["count"].append((pos, 8, f"{what} length"))
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]

    def value(pos, kind, what):
        if kind == STRING:
            return string(pos, what)
        if kind == ARRAY:
            item, count = struct.unpack_from("<IQ", data, pos)
            fields["type"].append((pos, 4, f"{what} item type"))
            fields["count"].append((pos + 4, 8, f"{what} count"))
            pos += 12
            for i in range(count):
                pos = value(pos, item, f"{what}[{i}]") if item in (STRING, ARRAY) else pos + _SCALAR[item]
            return pos
        if _SCALAR[kind] in (4, 8):
            fields["value"].append((pos, _SCALAR[kind], f"{what} value"))
        return pos + _SCALAR[kind]

    for _ in range(n_kv):
        start = pos
        pos = string(pos, "key")
        key = data[start + 8 : pos].decode()
        fields["key"].append((start + 8, pos - start - 8, key))
        fields["type"].append((pos, 4, f"{key} type"))
        pos = value(pos + 4, struct.unpack_from("<I", data, pos)[0], key)
    for _ in range(n_tensors):
        pos = string(pos, "tensor name")
        (dims,) = struct.unpack_from("<I", data, pos)
        fields["count"].append((pos, 4, "tensor dims"))
        fields["tensor"].extend((pos + 4 + 8 * d, 8, f"tensor dim {d}") for d in range(dims))
        pos += 4 + 8 * dims
        fields["type"].append((pos, 4, "tensor type"))
        fields["tensor"].append((pos + 4, 8, "tensor offset"))
        pos += 12
    fields["end"] = pos
    return fields


def gguf_field(rng, data, fields):
    """One field of the header set to a value out of range (a key: renamed)."""
    kind = rng.choice(["count", "type", "tensor", "value", "value", "key"])
    pos, width, what = rng.choice(fields[kind])
    if kind == "key":
        return data[:pos] + b"x" + data[pos + 1 :], f"key {what} renamed"
    if width == 8:
        n = rng.choice(HUGE + [0, 1, len(data), rng.randrange(1000)])
        packed = struct.pack("<Q", n)
    else:
        n = rng.choice([0, 1, 2, 2**31, 2**32 - 1, rng.randrange(40)])
        packed = struct.pack("<I", n)
    return data[:pos] + packed + data[pos + width :], f"{what} at {pos} = {n}"


def gguf_case(rng, files):
    name = rng.choice(sorted(files))
    data, fields = files[name]
    mutate = rng.choices([truncate, flip, lambda r, d: flip(r, d, 0, fields["end"]), garbage,
                          lambda r, d: gguf_field(r, d, fields)], [2, 1, 3, 1, 10])[0]
    data, what = mutate(rng, data)
    return name, data, what


# prompt files

def prompt_lines():
    lines = [{"id": "a", "prompt": "the quick brown fox"}, {"messages": [{"role": "user", "content": "hello"}]},
             {"id": 7, "input_ids": [5, 6, 7], "sampling": {"temperature": 0.5, "seed": 3, "stop": ["x"]}},
             {"prompt": "naïve café", "sampling": {"max_new_tokens": 4, "logprobs": 2, "stop_token_ids": [9]}}]
    return [json.dumps(line, ensure_ascii=False) for line in lines]


BAD_LINES = [
    "[" * 100_000 + "]" * 100_000,  # nested deeper than Python's recursion limit
    '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"id": ' + "9" * 5000 + ', "prompt": "a"}',  # more digits than Python turns into an int
    '{"input_ids": [' + "1" * 5000 + "]}",
    '{"input_ids": [1e999]}', '{"input_ids": [-1e999]}', '{"input_ids": [NaN]}', '{"input_ids": [Infinity]}',
    '{"input_ids": [' + str(2**70) + "]}", '{"input_ids": [1, ' + str(-(2**70)) + "]}",
    '{"prompt": "a", "sampling": {"max_new_tokens": ' + str(10**30) + "}}",
    '{"prompt": "a", "sampling": {"seed": ' + str(2**64) + "}}",
    '{"prompt": "a", "sampling": {"temperature": 1e999}}',
    '{"prompt": "a", "sampling": {"stop_token_ids": [' + str(2**64) + "]}}",
    '{"prompt": "a", "sampling": {"stop": ["\\ud800"]}}',
    '{"prompt": "\\ud800 lone surrogate"}', '{"id": "\\udfff", "prompt": "a"}',
    '{"messages": [{"role": "user", "content": "\\ud83d"}]}',
    '{"prompt": "nul \\u0000 inside"}', '{"id": "\\u0000", "prompt": "a"}', '{"prompt": "raw nul \x00"}', "\x00" * 64,
    '{"prompt": "a", "sampling": null}', '{"prompt": "a", "sampling": {"stop": [' + '"x", ' * 20000 + '"y"]}}',
    '{"input_ids": [' + "3, " * 200_000 + "3]}",
    '{"prompt": "' + "hello world " * 300_000 + '"}',  # a line of 3.6 MB
    '{"prompt": "' + "a" * 3_000_000 + '"}',  # one 3 MB word
]


def prompts_case(rng, base):
    lines = list(base)
    i = rng.randrange(len(lines) + 1)
    choice = rng.randrange(6)
    if choice == 0:
        return truncate(rng, ("\n".join(lines) + "\n").encode())
    if choice == 1:
        return flip(rng, ("\n".join(lines) + "\n").encode())
    if choice == 2:
        bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x00", b"\r", b"\xe2\x80\xa8"])
        data = ("\n".join(lines) + "\n").encode()
        at = rng.randrange(len(data))
        return data[:at] + bad + data[at:], f"{bad!r} inserted at {at}"
    if choice == 3:
        lines.insert(i, rng.choice(BAD_LINES))
        return ("\n".join(lines) + "\n").encode(), f"line {i + 1}: {lines[i][:40]!r}..."
    if choice == 4:
        line = json.loads(rng.choice(base))
        key = rng.choice(["id", "prompt", "input_ids", "messages", "sampling"])
        line[key] = rng.choice([None, True, -1, 2**64, 1e308, "", "x", [], [None], {}, [{"role": 1}], {"seed": -1}])
        lines.insert(i, json.dumps(line))
        return ("\n".join(lines) + "\n").encode(), f"line {i + 1}: {key} = {line[key]!r}"
    return garbage(rng, b"")


# ---- the worker side ----

class Hang(Exception):
    pass


def _alarm(*_):
    raise Hang(f"no answer within {CASE_SECONDS} s")


def where(error):
    """file:line of the innermost frame in mpinfer (else the innermost) of an exception."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if f"{os.sep}mpinfer{os.sep}" in f.filename] or frames
    return f"{os.path.relpath(ours[-1].filename)}:{ours[-1].lineno}" if ours else "?"


def worker(kind, seed, cases, base, work):
    """Run the cases, printing one JSON line per case (outcome ok, error, or what went wrong)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from mpinfer.errors import UserError

    prepare, run_case = {"hf": hf_worker, "gguf": gguf_worker, "prompts": prompts_worker}[kind](base, work)
    signal.signal(signal.SIGALRM, _alarm)
    size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + SPARE_BYTES, resource.RLIM_INFINITY))
    for case in range(cases):
        rng = random.Random(seed * 1_000_003 + case)
        path, what = prepare(rng)
        result = {"case": case, "mutation": what}
        start = time.perf_counter()
        signal.alarm(CASE_SECONDS)
        try:
            run_case(path)
            result.update(outcome="ok", message="")
        except UserError as e:
            result.update(outcome="error", message=str(e))
        except BaseException as e:  # what the test reports: anything but a UserError
            result.update(outcome=type(e).__name__, message=f"{where(e)}: {e}"[:300])
        finally:
            signal.alarm(0)
        result["seconds"] = round(time.perf_counter() - start, 3)
        print(json.dumps(result), flush=True)


def hf_worker(base, work):
    from mpinfer.backend import get_backend
    from mpinfer.model import Decoder
    from mpinfer.tokenizer import load_tokenizer
    from mpinfer.weights import open_checkpoint

    folder = os.path.join(work, "model")
    shutil.copytree(base, folder)
    files = {name: open(os.path.join(folder, name), "rb").read() for name in
             ("model.safetensors", "config.json", "tokenizer.json")}
    files["bf16"] = to_bf16(files["model.safetensors"])
    names = split_safetensors(files["model.safetensors"])[0].keys() - {"__metadata__"}
    files[INDEX] = json.dumps({"weight_map": {name: "model.safetensors" for name in sorted(names)}}).encode()
    be = get_backend("numpy")

    def prepare(rng):
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            open(os.path.join(folder, name), "wb").write(files[name])
        if os.path.exists(os.path.join(folder, INDEX)):
            os.remove(os.path.join(folder, INDEX))
        name, data, what = hf_case(rng, files)
        open(os.path.join(folder, name), "wb").write(data)
        return folder, f"{name}: {what}"

    def run_case(path):
        ckpt = open_checkpoint(path)
        load_tokenizer(path, ckpt).encode("hello world")
        for name in ckpt.names():  # every tensor as the file declares it, whole and a row range
            shape = tuple(ckpt._shape(name))
            ckpt.get(name, shape)
            ckpt.get(name, shape, rows=slice(1, 3))
        Decoder(ckpt, be)  # every tensor as the config expects it

    return prepare, run_case


def gguf_worker(base, work):
    from mpinfer.backend import get_backend
    from mpinfer.model import Decoder
    from mpinfer.tokenizer import load_tokenizer
    from mpinfer.weights import open_checkpoint

    files = {}
    for name in sorted(os.listdir(base)):
        data = open(os.path.join(base, name), "rb").read()
        files[name] = (data, gguf_fields(data))
    be = get_backend("numpy")

    def prepare(rng):
        name, data, what = gguf_case(rng, files)
        path = os.path.join(work, "case.gguf")
        open(path, "wb").write(data)
        return path, f"{name}: {what}"

    def run_case(path):
        ckpt = open_checkpoint(path)
        tokenizer = load_tokenizer(path, ckpt)
        tokenizer.encode("hello world")
        tokenizer.encode_chat([{"role": "user", "content": "hi"}])
        for name in ckpt.names():  # every tensor as the file declares it
            ckpt.get(name, tuple(ckpt._shape(name)))
        Decoder(ckpt, be)

    return prepare, run_case


def prompts_worker(base, work):
    from mpinfer.io.prompts import read_prompts
    from mpinfer.params import SamplingParams
    from mpinfer.tokenizer import load_tokenizer
    from mpinfer.weights import open_checkpoint

    tokenizer = load_tokenizer(base, open_checkpoint(base))
    path = os.path.join(work, "prompts.jsonl")
    lines = prompt_lines()

    def prepare(rng):
        data, what = prompts_case(rng, lines)
        open(path, "wb").write(data)
        return path, what

    def run_case(path):
        for skip_invalid in (False, True):
            for r in read_prompts(path, tokenizer, SamplingParams(), 64, 300, skip_invalid):
                # what the results file will hold must be storable: UTF-8 text, int32 ids
                r.id.encode("utf-8")
                assert all(0 <= t < 300 for t in r.prompt_ids.tolist())
                if r.error is None:
                    for stop in r.sampling.stop:
                        stop.encode("utf-8")

    return prepare, run_case


if __name__ == "__main__":
    kind, seed, cases, *args = sys.argv[1:]
    worker(kind, int(seed), int(cases), *args)
