"""The job file: defaults, --set overrides, relative paths, one-line errors, the TOML round trip."""

import os
import tomllib

import pytest

from mpinfer.params import SamplingParams
from mpinfer.errors import UserError
from mpinfer.job import Engine, Parallel, load_job

BASE = '[model]\npath = "model"\n[input]\npath = "prompts.jsonl"\n[output]\npath = "out/results.h5"\n'


@pytest.fixture
def job_dir(tmp_path, monkeypatch):
    """A job folder with a model folder and a prompt file, and a current directory elsewhere."""
    (tmp_path / "model").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path


def write(folder, text):
    path = folder / "job.toml"
    path.write_text(text)
    return str(path)


def error(path, *overrides):
    with pytest.raises(UserError) as e:
        load_job(path, overrides)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_defaults_and_relative_paths(job_dir):
    job = load_job(write(job_dir, BASE))
    assert job.model_path == str(job_dir / "model")
    assert job.input_path == str(job_dir / "prompts.jsonl")
    assert job.output_path == str(job_dir / "out" / "results.h5")
    assert job.sampling == SamplingParams()
    assert job.parallel == Parallel(1, 1, 1, 1)
    assert job.engine == Engine("auto", 512, 128, 16, 1.0, 5.0)


def test_sections_read(job_dir):
    text = BASE + (
        "[sampling]\nmax_new_tokens = 8\ntemperature = 1\ntop_p = 0.9\nstop = \"</s>\"\nstop_token_ids = [2, 3]\n"
        "[parallel]\ntp = 2\npp = 2\n[engine]\nbackend = \"numpy\"\nblock_size = 32\nkv_cache_gb = 2\n"
    )
    job = load_job(write(job_dir, text))
    assert job.sampling == SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, stop=("</s>",),
                                          stop_token_ids=(2, 3))
    assert isinstance(job.sampling.temperature, float) and isinstance(job.engine.kv_cache_gb, float)
    assert job.parallel == Parallel(tp=2, pp=2)
    assert job.engine == Engine(backend="numpy", block_size=32, kv_cache_gb=2.0)


def test_set_overrides(job_dir):
    (job_dir / "cwd" / "other.jsonl").write_text("{}\n")
    job = load_job(write(job_dir, BASE), [
        "parallel.tp=4", "sampling.temperature=0.5", "input.path=other.jsonl", 'sampling.stop=["\\n", "END"]',
        f"model.path={job_dir}/model", "engine.backend=cuda", "sampling.seed = 7",
    ])
    assert job.parallel.tp == 4
    assert job.sampling.temperature == 0.5 and job.sampling.seed == 7
    assert job.sampling.stop == ("\n", "END")
    assert job.input_path == str(job_dir / "cwd" / "other.jsonl")  # --set paths: the current directory
    assert job.model_path == str(job_dir / "model")
    assert job.engine.backend == "cuda"


def test_toml_round_trip(job_dir):
    text = BASE + '[sampling]\nstop = ["\\n", "say \\"hi\\"", "tab\\there", "é\\u007f"]\ntemperature = 1e-05\n'
    path = write(job_dir, text)
    job = load_job(path, ["parallel.cp=2", "engine.flush_seconds=0.25"])
    effective = job.toml()
    for line in ('path = "' + str(job_dir / "model") + '"', "cp = 2", "flush_seconds = 0.25", "stop_token_ids = []",
                 "logprobs = 0", 'backend = "auto"'):
        assert line in effective.splitlines(), line
    write(job_dir, effective)
    assert load_job(path) == job


def test_syntax_error(job_dir):
    path = write(job_dir, BASE + "[parallel]\ntp = = 2\n")
    message = error(path)
    assert message.startswith(f"{path}: not valid TOML:") and "line 8" in message


def test_missing_job_file(job_dir):
    assert error(str(job_dir / "nope.toml")) == f"{job_dir / 'nope.toml'}: no such job file"


def test_unknown_section_and_key(job_dir):
    path = write(job_dir, BASE + "[paralel]\ntp = 2\n")
    assert error(path) == f"{path}: unknown section [paralel] (known: model, input, output, sampling, parallel, engine, moe)"
    path = write(job_dir, BASE + "[parallel]\ntq = 2\n")
    assert error(path) == f"{path}: parallel.tq: unknown key (known: tp, pp, ep, cp, micro_batches, cp_method, cp_threshold, sp, auto)"
    path = write(job_dir, BASE + "[sampling]\ntemp = 2\n")
    assert error(path).startswith(f"{path}: sampling.temp: unknown key (known: max_new_tokens, temperature,")


@pytest.mark.parametrize("section,line,expected", [
    ("parallel", 'tp = "two"', 'parallel.tp: expected an integer, got "two"'),
    ("parallel", "tp = 2.0", "parallel.tp: expected an integer, got 2.0"),
    ("sampling", "seed = true", "sampling.seed: expected an integer, got true"),
    ("sampling", "stop = [1]", "sampling.stop: expected a string, got 1"),
    ("engine", "kv_cache_gb = inf", "engine.kv_cache_gb: expected a finite number, got inf"),
])
def test_wrong_type(job_dir, section, line, expected):
    path = write(job_dir, BASE + f"[{section}]\n{line}\n")
    assert error(path) == f"{path}: {expected}"


@pytest.mark.parametrize("section,line,expected", [
    ("parallel", "pp = 0", "parallel.pp: must be >= 1, got 0"),
    ("sampling", "top_p = 1.5", "sampling.top_p: must be in (0, 1], got 1.5"),
    ("sampling", "logprobs = 21", "sampling.logprobs: must be in [0, 20], got 21"),
    ("engine", "block_size = 24", "engine.block_size: must be a power of two from 1 to 256, got 24"),
    ("engine", "max_batch_tokens = 8", "engine.max_batch_tokens: must be >= 16, got 8"),
    ("engine", 'backend = "rocm"', 'engine.backend: must be one of auto, numpy, cuda, got "rocm"'),
])
def test_bad_range(job_dir, section, line, expected):
    path = write(job_dir, BASE + f"[{section}]\n{line}\n")
    assert error(path) == f"{path}: {expected}"


def test_paths_checked(job_dir):
    path = write(job_dir, BASE.replace('"model"', '"missing.gguf"'))
    assert error(path) == f"{path}: model.path: {job_dir / 'missing.gguf'} does not exist"
    path = write(job_dir, BASE.replace('"prompts.jsonl"', '"model"'))
    assert error(path) == f"{path}: input.path: {job_dir / 'model'} is a folder, not a file"
    path = write(job_dir, BASE.replace('"out/results.h5"', '"gone/results.h5"'))
    assert error(path) == f"{path}: output.path: folder {job_dir / 'gone'} does not exist"
    path = write(job_dir, BASE.replace('[model]\npath = "model"\n', ""))
    assert error(path).startswith(f"{path}: model.path: missing")


def test_set_errors(job_dir):
    path = write(job_dir, BASE)
    assert error(path, "parallel.tp") == "--set parallel.tp: expected section.key=value (e.g. --set parallel.tp=2)"
    assert error(path, "tp=2").startswith("--set tp: expected section.key=value")
    assert error(path, "parallel.tq=2") == "--set parallel.tq: unknown key (known: tp, pp, ep, cp, micro_batches, cp_method, cp_threshold, sp, auto)"
    assert error(path, "paralel.tp=2").startswith("--set paralel.tp: unknown section 'paralel' (known: model,")
    assert error(path, "parallel.tp=two") == '--set parallel.tp: expected an integer, got "two"'
    assert error(path, "model.path=nope") == f"--set model.path: {os.getcwd()}/nope does not exist"


def test_booleans_and_moe_paths(job_dir):
    """parallel.sp takes true/false (not 1), and the effective TOML writes it back as TOML;
    moe.load_from is a path relative to the job file's folder that must exist."""
    path = write(job_dir, BASE + "[parallel]\nsp = true\n")
    job = load_job(path)
    assert job.parallel.sp is True and "sp = true" in job.toml()
    assert tomllib.loads(job.toml())["parallel"]["sp"] is True
    assert error(path, "parallel.sp=1") == "--set parallel.sp: expected true or false, got 1"
    (job_dir / "earlier.h5").write_bytes(b"")
    assert load_job(write(job_dir, BASE + '[moe]\nload_from = "earlier.h5"\n')).moe.load_from == str(job_dir / "earlier.h5")
    assert "moe.load_from: " in error(write(job_dir, BASE + '[moe]\nload_from = "none.h5"\n'))
