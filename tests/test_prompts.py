"""The prompt file: the three line forms, ids, per-line sampling, and every per-line problem,
as one UserError or (skip_invalid) as requests with an error."""

import json

import numpy as np
import pytest

from mpinfer.params import SamplingParams
from mpinfer.errors import UserError
from mpinfer.io.prompts import read_prompts
from mpinfer.tokenizer import load_tokenizer
from mpinfer.weights import open_checkpoint

DEFAULTS = SamplingParams(max_new_tokens=16)
HINT = "(--skip-invalid records them as errors and goes on)"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    folder = tiny_model("llama")
    return load_tokenizer(folder, open_checkpoint(folder))


def write(tmp_path, *lines):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def read(path, tokenizer, skip_invalid=False, max_context=64):
    return read_prompts(path, tokenizer, DEFAULTS, max_context, 300, skip_invalid)


def problem(tmp_path, tokenizer, line, max_context=64):
    """The error of a single bad line, checked in both modes."""
    path = write(tmp_path, line)
    with pytest.raises(UserError) as e:
        read(path, tokenizer, max_context=max_context)
    [request] = read(path, tokenizer, skip_invalid=True, max_context=max_context)
    assert str(e.value) == f"{path}: 1 invalid line {HINT}: line 1: {request.error}"
    assert request.prompt_ids.size == 0 and request.prompt_ids.dtype == np.int32
    return request.error


def test_three_forms(tmp_path, tokenizer):
    messages = [{"role": "user", "content": "hello world"}]
    path = write(tmp_path, {"id": "a", "prompt": "the quick brown fox"}, {"id": "b", "messages": messages},
                 {"id": "c", "input_ids": [5, 6, 7]})
    a, b, c = read(path, tokenizer)
    assert (a.index, a.id, b.index, b.id, c.index, c.id) == (0, "a", 1, "b", 2, "c")
    assert a.prompt_ids.tolist() == tokenizer.encode("the quick brown fox")
    assert b.prompt_ids.tolist() == tokenizer.encode_chat(messages)
    assert c.prompt_ids.tolist() == [5, 6, 7]
    assert all(r.prompt_ids.dtype == np.int32 and r.error is None and r.sampling == DEFAULTS for r in (a, b, c))


def test_many_plain_prompts_match_single_encode(tmp_path, tokenizer):
    texts = [f"hello {i} naïve café " * (i % 7) + "x" for i in range(5000)]  # more than one batch
    requests = read(write(tmp_path, *({"prompt": t} for t in texts)), tokenizer, max_context=512)
    assert [r.prompt_ids.tolist() for r in requests] == [tokenizer.encode(t) for t in texts]


def test_ids_blank_lines_and_extra_keys(tmp_path, tokenizer):
    path = write(tmp_path, {"prompt": "a", "answer": "ignored"}, "", "   ", {"id": 17, "prompt": "b"},
                 {"prompt": "c"})
    requests = read(path, tokenizer)
    assert [(r.index, r.id) for r in requests] == [(0, "0"), (3, "17"), (4, "4")]


def test_sampling_override(tmp_path, tokenizer):
    path = write(tmp_path, {"prompt": "a", "sampling": {"temperature": 1, "stop": "\n", "seed": 3}}, {"prompt": "b"})
    a, b = read(path, tokenizer)
    assert a.sampling == SamplingParams(max_new_tokens=16, temperature=1.0, stop=("\n",), seed=3)
    assert b.sampling == DEFAULTS


@pytest.mark.parametrize("line,expected", [
    ('{"prompt": "a",}', "invalid JSON (Expecting property name enclosed in double quotes at column 16)"),
    ("[1, 2]", "expected a JSON object, got [1, 2]"),
    ({"id": "x"}, "expected exactly one of prompt, messages, input_ids; got none"),
    ({"prompt": "a", "input_ids": [1]}, "expected exactly one of prompt, messages, input_ids; got prompt and input_ids"),
    ({"prompt": 5}, "prompt: expected a string, got 5"),
    ({"prompt": "a", "id": 1.5}, "id: expected a string or an integer, got 1.5"),
    ({"prompt": "a", "id": True}, "id: expected a string or an integer, got true"),
    ({"messages": []}, "messages: expected a non-empty list, got []"),
    ({"messages": [{"role": "user"}]}, 'messages[0]: expected {"role": string, "content": string}, got {"role": "user"}'),
    ({"input_ids": []}, "input_ids: expected a non-empty list of integers, got []"),
    ({"input_ids": [1, 2.0]}, "input_ids: expected a non-empty list of integers, got [1, 2.0]"),
    ({"input_ids": [1, 300]}, "input_ids: token 300 is outside the vocabulary [0, 300)"),
    ({"input_ids": [-1]}, "input_ids: token -1 is outside the vocabulary [0, 300)"),
    ({"prompt": "a", "sampling": {"top_p": 1.5}}, "sampling: top_p: must be in (0, 1], got 1.5"),
    ({"prompt": "a", "sampling": {"topp": 1}}, "sampling: unknown key 'topp' (known: max_new_tokens, temperature, "
     "top_k, top_p, min_p, seed, stop, stop_token_ids, logprobs)"),
    ({"prompt": "a", "sampling": 3}, "sampling: expected an object, got 3"),
    ({"prompt": ""}, "prompt is empty after tokenization"),
    ({"input_ids": list(range(64))}, "prompt has 64 tokens; the model's context is 64"),
])
def test_line_problems(tmp_path, tokenizer, line, expected):
    assert problem(tmp_path, tokenizer, line) == expected


def test_context_limit(tmp_path, tokenizer):
    [request] = read(write(tmp_path, {"input_ids": list(range(63))}), tokenizer)  # one new token fits
    assert request.error is None and len(request.prompt_ids) == 63
    text = "the quick brown fox " * 40
    n = len(tokenizer.encode(text))
    assert n > 64
    assert problem(tmp_path, tokenizer, {"prompt": text}) == f"prompt has {n} tokens; the model's context is 64"


def test_chat_template_failure_is_the_lines_problem(tmp_path, tokenizer):
    tokenizer = type(tokenizer)(tokenizer.backend, "{{ raise_exception('no system role') }}", {}, "tok.json")
    line = {"messages": [{"role": "system", "content": "x"}]}
    assert problem(tmp_path, tokenizer, line) == "tok.json: chat template failed: no system role"


def test_duplicate_ids(tmp_path, tokenizer):
    # line 3 has no id, so its id is "2": the id given on line 2, an invalid line that still claims it
    path = write(tmp_path, {"id": "q1", "prompt": "a"}, {"id": 2, "prompt": 5}, {"prompt": "c"},
                 {"id": "q1", "prompt": "d"})
    with pytest.raises(UserError) as e:
        read(path, tokenizer)
    assert str(e.value) == (f"{path}: 3 invalid lines {HINT}: line 2: prompt: expected a string, got 5; "
                            "line 3: duplicate id '2' (first on line 2); line 4: duplicate id 'q1' (first on line 1)")
    requests = read(path, tokenizer, skip_invalid=True)
    # the results file keeps ids unique: a later line that repeats an id gets "@line N"
    assert [(r.id, r.error is None) for r in requests] == [("q1", True), ("2", False), ("2@line3", False),
                                                           ("q1@line4", False)]


def test_combined_message_lists_first_five(tmp_path, tokenizer):
    lines = [{"prompt": "ok"}] + [{"prompt": i} for i in range(1, 8)] + ["not json"]
    path = write(tmp_path, *lines)
    with pytest.raises(UserError) as e:
        read(path, tokenizer)
    listed = "; ".join(f"line {i + 1}: prompt: expected a string, got {i}" for i in range(1, 6))
    assert str(e.value) == f"{path}: 8 invalid lines {HINT}: {listed}; and 3 more"


def test_skip_invalid_keeps_every_line(tmp_path, tokenizer):
    path = write(tmp_path, {"id": "a", "prompt": "hello"}, "{bad", {"id": ["x"], "prompt": "y"},
                 {"id": "d", "input_ids": [1, 999]}, {"id": "e", "prompt": "e", "sampling": {"seed": 5}})
    requests = read(path, tokenizer, skip_invalid=True)
    assert [(r.index, r.id) for r in requests] == [(0, "a"), (1, "1"), (2, "2"), (3, "d"), (4, "e")]
    assert [r.error is None for r in requests] == [True, False, False, False, True]
    assert requests[1].error.startswith("invalid JSON (")
    assert requests[2].error == 'id: expected a string or an integer, got ["x"]'
    assert [len(r.prompt_ids) > 0 for r in requests] == [True, False, False, False, True]
    assert requests[4].sampling.seed == 5


def test_file_problems(tmp_path, tokenizer):
    with pytest.raises(UserError, match="nope.jsonl: no such prompt file$"):
        read(str(tmp_path / "nope.jsonl"), tokenizer)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin1.jsonl: line 2: not UTF-8 text \(invalid continuation byte\)$"):
        read(str(path), tokenizer)


def test_byte_order_mark_and_crlf(tmp_path, tokenizer):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"prompt": "b\xe2\x80\xa8c"}\r\n')  # U+2028 inside a string
    a, b = read(str(path), tokenizer)
    assert a.prompt_ids.tolist() == tokenizer.encode("a") and b.prompt_ids.tolist() == tokenizer.encode("b\u2028c")
