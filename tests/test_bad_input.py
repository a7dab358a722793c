"""The bad-input table of the README's troubleshooting section, through `mpinfer run`: each
mistake gives exit code 2, one line on stderr naming the culprit (file, line or key), no
traceback, and leaves an existing results file byte for byte as it was. (The rest of the table
is in test_run.py, test_errors.py and test_fuzz.py.)

One rank unless the layout matters. The results file already there is a real one, of another
run of the job with other prompts, so it is what a user has on disk when they rerun a job."""

import json
import os
import shutil
import struct

import pytest

from test_run import mpinfer, prompt_lines, write_job

ROOT = os.geteuid() == 0  # root reads and writes whatever the file modes say


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def earlier(model, tmp_path_factory):
    """The bytes of a finished results file, from a run with other prompts."""
    job, out = write_job(tmp_path_factory.mktemp("earlier"), model, prompt_lines(2, seed=5),
                         sampling={"max_new_tokens": 2})
    done = mpinfer(1, "run", job)
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


def copy_model(model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    return folder


def int32_tensor(folder):
    """Relabel a float32 tensor as I32 in the safetensors header (same size, so the header's
    length stays and the file still parses)."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].replace(b'"model.norm.weight":{"dtype":"F32"', b'"model.norm.weight":{"dtype":"I32"')
    assert header != data[8 : 8 + n]
    path.write_bytes(data[:8] + header + data[8 + n :])
    return path


def unwritable_output(tmp_path):
    """An output path where no file can be created: in a read-only folder, or as root in /proc."""
    if ROOT:
        return "/proc/results.h5"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder / "results.h5")


# name -> setup(tmp_path, job, model): (ranks, arguments after the job file, texts the message must hold)
CASES = {}


def case(name):
    def add(setup):
        CASES[name] = setup
        return setup
    return add


def set_key(name, key, value):
    CASES[name] = lambda tmp_path, job, model: (1, ["--set", f"{key}={value(tmp_path)}"], [f"--set {key}: "])


def bad_prompts(name, text, expected):
    def setup(tmp_path, job, model):
        (tmp_path / "job.jsonl").write_bytes(text)
        return 1, [], ["job.jsonl", expected]
    CASES[name] = setup


def bad_model_file(name, edit, expected):
    """edit(model folder) spoils one file of a copy of the model and returns that file."""
    def setup(tmp_path, job, model):
        folder = copy_model(model, tmp_path)
        return 1, ["--set", f"model.path={folder}"], [str(edit(folder)), expected]
    CASES[name] = setup


@case("job-file-missing")
def _(tmp_path, job, model):
    os.remove(job)
    return 1, [], [f"{job}: no such job file"]


@case("set-unknown-key")
def _(tmp_path, job, model):
    return 1, ["--set", "parallel.tq=2"], ["--set parallel.tq: unknown key (known: tp, pp,"]


set_key("output-folder-missing", "output.path", lambda tmp_path: tmp_path / "gone" / "r.h5")
set_key("output-is-a-folder", "output.path", lambda tmp_path: tmp_path)


@case("output-not-writable")
def _(tmp_path, job, model):
    path = unwritable_output(tmp_path)
    return 1, ["--set", f"output.path={path}"], [f"{path}: cannot write the results file here"]


@case("results-not-mpinfer")
def _(tmp_path, job, model):
    (tmp_path / "job.h5").write_bytes(b"not HDF5")
    return 1, [], ["job.h5: not an mpinfer results file (use --overwrite to replace it)"]


@case("results-of-another-job")
def _(tmp_path, job, model):
    return 1, [], ["job.h5 holds results of a different job (prompts differ); use --overwrite"]


set_key("prompt-file-is-a-folder", "input.path", lambda tmp_path: tmp_path)


@case("prompt-file-unreadable")
def _(tmp_path, job, model):
    if ROOT:  # root reads a file of mode 000, but not this one
        return 1, ["--set", "input.path=/proc/sys/vm/drop_caches"], ["drop_caches: cannot read the prompt file "
                                                                     "(Permission denied)"]
    (tmp_path / "job.jsonl").chmod(0)
    return 1, [], ["job.jsonl: cannot read the prompt file (Permission denied)"]


bad_prompts("prompt-not-utf8", b'{"prompt": "caf\xe9"}\n', "line 1: not UTF-8 text")
bad_prompts("prompt-token-outside-vocabulary", b'{"input_ids": [1, 300]}\n',
            "line 1: input_ids: token 300 is outside the vocabulary [0, 300)")
bad_prompts("prompt-nested-too-deeply", b'{"prompt": "a"}\n' + b"[" * 5000 + b"\n",
            "line 2: invalid JSON (nested too deeply)")
bad_prompts("prompt-huge-integer", b'{"id": ' + b"7" * 5000 + b', "prompt": "a"}\n',
            "line 1: invalid JSON (an integer of more than 4300 digits)")
bad_prompts("prompt-lone-surrogate", b'{"prompt": "\\ud800"}\n', "line 1: a string holds an unpaired UTF-16 surrogate")


@case("layout-does-not-divide-world")
def _(tmp_path, job, model):
    return 1, ["--set", "parallel.tp=2"], ["job.toml: [parallel]: tp*pp*cp = 2*1*1 = 2 does not divide the world of 1 ranks"]


@case("tp-does-not-divide-heads")
def _(tmp_path, job, model):
    return 4, ["--set", "parallel.tp=4"], ["job.toml: parallel.tp = 4 does not divide the model's attention heads 6"]


def _config_not_json(folder):
    (folder / "config.json").write_text("{")
    return folder / "config.json"


def _config_size_out_of_range(folder):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_hidden_layers": 10**12}))
    return path


def _tokenizer_not_json(folder):
    (folder / "tokenizer.json").write_text("not JSON")
    return folder / "tokenizer.json"


bad_model_file("config-not-json", _config_not_json, "not a readable JSON file")
bad_model_file("config-size-out-of-range", _config_size_out_of_range, "num_hidden_layers = 1000000000000 is out of range")
bad_model_file("tokenizer-not-json", _tokenizer_not_json, "not a valid tokenizer file")


@case("weight-of-integer-dtype")
def _(tmp_path, job, model):
    # weights are read after the results file is opened, which would refuse another job's
    # results first: this one runs with no results file and must not leave one
    os.remove(tmp_path / "job.h5")
    folder = copy_model(model, tmp_path)
    return 1, ["--set", f"model.path={folder}"], [f"{int32_tensor(folder)}: tensor 'model.norm.weight' has dtype I32"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input(model, earlier, tmp_path, name):
    job, out = write_job(tmp_path, model, prompt_lines(2), sampling={"max_new_tokens": 2})
    out.write_bytes(earlier)
    ranks, args, expected = CASES[name](tmp_path, job, model)
    before = out.read_bytes() if out.exists() else None
    done = mpinfer(ranks, "run", job, *args, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("mpinfer: error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    assert (out.read_bytes() if out.exists() else None) == before
