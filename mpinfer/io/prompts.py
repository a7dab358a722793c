"""The prompt file (JSON Lines, DESIGN.md section 1): one request a line, checked and tokenized.

A line is {"prompt": "text"}, {"messages": [{"role": ..., "content": ...}, ...]} (rendered
with the model's chat template) or {"input_ids": [1, 2, 3]}, with an optional "id" (a string
or an integer; default the 0-based line number) and an optional "sampling" object overriding
the job's sampling. Other keys are ignored: datasets carry extra columns. Blank lines are
skipped but keep their number, so `index` is always the line number in the file.

Every problem of every line is found before anything runs. Without skip_invalid they are one
UserError; with it, an invalid line comes back as a Request with `error` set, and the run
records it as finished with reason "error".
"""

import dataclasses
import json
import re
import sys

import numpy as np

from ..params import SamplingParams, show
from ..errors import UserError

FORMS = ("prompt", "messages", "input_ids")
_SHOWN = 5  # problems quoted in the error without skip_invalid
_BATCH = 4096  # plain prompts tokenized at once: parallel in the tokenizer, bounded memory
_EMPTY = np.zeros(0, np.int32)
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # the JSON escape of a UTF-16 surrogate


@dataclasses.dataclass
class Request:
    index: int  # 0-based line number in the prompt file
    id: str
    prompt_ids: np.ndarray  # int32 token ids (empty for an invalid line)
    sampling: SamplingParams  # job defaults with the line's overrides
    error: str | None = None  # why the line is invalid (only with skip_invalid)


class _Invalid(Exception):
    """A problem of one line; the message is the text after "line N: "."""


def read_prompts(path, tokenizer, defaults, max_context, vocab_size, skip_invalid=False):
    """The requests of a prompt file, one per non-blank line, in file order."""
    requests = []
    first_line = {}  # id -> 0-based index of the line that used it first
    texts = []  # (request, text) of the plain prompts, tokenized in batches below
    for index, line in _lines(path):
        request = Request(index, str(index), _EMPTY, defaults)
        requests.append(request)
        try:
            row = _parse(line, request)
            if request.id in first_line:
                raise _Invalid(f"duplicate id {request.id!r} (first on line {first_line[request.id] + 1})")
            first_line[request.id] = index
            if "sampling" in row:
                if not isinstance(row["sampling"], dict):
                    raise _Invalid(f"sampling: expected an object, got {_brief(row['sampling'])}")
                try:
                    request.sampling = defaults.override(row["sampling"])
                except ValueError as e:
                    raise _Invalid(f"sampling: {e}") from None
            ids = _prompt_ids(row, tokenizer, vocab_size)
            if ids is None:
                texts.append((request, row["prompt"]))
            else:
                request.prompt_ids = ids
        except _Invalid as e:
            request.error = str(e)
            if first_line.setdefault(request.id, index) != index:  # keep ids unique in the results
                request.id = f"{request.id}@line{index + 1}"
    for start in range(0, len(texts), _BATCH):
        batch = texts[start : start + _BATCH]
        for (request, _), ids in zip(batch, tokenizer.encode_batch([t for _, t in batch])):
            request.prompt_ids = np.array(ids, np.int32)
    for request in requests:
        n = len(request.prompt_ids)
        if request.error is None and n == 0:
            request.error = "prompt is empty after tokenization"
        elif request.error is None and n >= max_context:  # at least one new token must fit
            request.error = f"prompt has {n} tokens; the model's context is {max_context}"
            request.prompt_ids = _EMPTY
    invalid = [r for r in requests if r.error is not None]
    if invalid and not skip_invalid:
        listed = "; ".join(f"line {r.index + 1}: {r.error}" for r in invalid[:_SHOWN])
        more = f"; and {len(invalid) - _SHOWN} more" if len(invalid) > _SHOWN else ""
        lines = "1 invalid line" if len(invalid) == 1 else f"{len(invalid)} invalid lines"
        raise UserError(f"{path}: {lines} (--skip-invalid records them as errors and goes on): {listed}{more}")
    return requests


def _lines(path):
    """(0-based index, text) of the non-blank lines."""
    try:
        with open(path, "rb") as f:  # bytes, split at b"\n" only: JSON strings may hold U+2028
            for index, raw in enumerate(f):
                if index == 0:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark some editors write
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}: line {index + 1}: not UTF-8 text ({e.reason})") from None
                if line.strip():
                    yield index, line
    except FileNotFoundError:
        raise UserError(f"{path}: no such prompt file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the prompt file ({e.strerror})") from None


def _parse(line, request):
    """The line's JSON object; sets request.id."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Invalid(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise _Invalid("invalid JSON (nested too deeply)") from None
    except ValueError:  # the one other error of json.loads: Python's limit on integer digits
        raise _Invalid(f"invalid JSON (an integer of more than {sys.get_int_max_str_digits()} digits)") from None
    if _SURROGATE.search(line):  # JSON may escape half of a UTF-16 pair alone: not text, not storable
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise _Invalid(f"a string holds an unpaired UTF-16 surrogate ({e.object[e.start]!r}), which is not text") from None
    if not isinstance(row, dict):
        raise _Invalid(f"expected a JSON object, got {_brief(row)}")
    if "id" in row:
        if type(row["id"]) not in (str, int):  # a bool is not an id
            raise _Invalid(f"id: expected a string or an integer, got {_brief(row['id'])}")
        request.id = str(row["id"])
    return row


def _prompt_ids(row, tokenizer, vocab_size):
    """The token ids of the line's prompt, or None for a plain prompt, tokenized later in a batch."""
    forms = [form for form in FORMS if form in row]
    if len(forms) != 1:
        given = f"got {' and '.join(forms)}" if forms else "got none"
        raise _Invalid(f"expected exactly one of {', '.join(FORMS)}; {given}")
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise _Invalid(f"prompt: expected a string, got {_brief(row['prompt'])}")
        return None
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise _Invalid(f"messages: expected a non-empty list, got {_brief(messages)}")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise _Invalid(f'messages[{i}]: expected {{"role": string, "content": string}}, got {_brief(m)}')
        try:
            return np.array(tokenizer.encode_chat(messages), np.int32)
        except UserError as e:
            raise _Invalid(str(e)) from None
    ids = row["input_ids"]
    if not isinstance(ids, list) or not ids or not all(type(t) is int for t in ids):
        raise _Invalid(f"input_ids: expected a non-empty list of integers, got {_brief(ids)}")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise _Invalid(f"input_ids: token {bad} is outside the vocabulary [0, {vocab_size})")
    return np.array(ids, np.int32)


def _brief(value):
    """A value as JSON, cut short: a wrong prompt may be a whole document."""
    text = show(value)
    return text if len(text) <= 40 else text[:37] + "..."
