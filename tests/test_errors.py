"""Bad model input exits with code 2 and one line naming the file and the problem, also when\nevery rank of a job meets it."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from gguf_writer import write_gguf
from safetensors.numpy import load_file, save_file


def run_job(model, tmp_path):
    """`mpinfer run` on 2 ranks with one prompt: (exit code, stderr)."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\npath = "{model}"\n[input]\npath = "p.jsonl"\n[output]\npath = "r.h5"\n')
    bin_ = os.path.dirname(sys.executable)
    done = subprocess.run([os.path.join(bin_, "mpiexec"), "-n", "2", os.path.join(bin_, "mpinfer"), "run", str(job)],
                          capture_output=True, text=True, timeout=120)
    assert not (tmp_path / "r.h5").exists()  # nothing written for bad input
    return done.returncode, done.stderr.strip()


def assert_one_line_error(model, *expected):
    code, err = run_job(model, Path(tempfile.mkdtemp()))
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


@pytest.fixture
def copy_of(tiny_model, tmp_path):
    def make(arch):
        folder = tmp_path / arch
        shutil.copytree(tiny_model(arch), folder)
        return folder

    return make


def test_missing_config(copy_of):
    folder = copy_of("llama")
    os.remove(folder / "config.json")
    assert_one_line_error(folder, str(folder), "no config.json")


def test_unsupported_architecture(copy_of):
    folder = copy_of("llama")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(folder, "config.json", "unsupported architecture 'gpt_neox'")


def test_truncated_safetensors(copy_of):
    folder = copy_of("llama")
    path = folder / "model.safetensors"
    os.truncate(path, os.path.getsize(path) - 1000)
    assert_one_line_error(folder, str(path), "not a valid safetensors file")


def test_garbage_safetensors_header(copy_of):
    folder = copy_of("llama")
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    path.write_bytes(bytes(data))
    assert_one_line_error(folder, str(path), "not a valid safetensors file")


def test_tensor_of_wrong_shape(copy_of):
    folder = copy_of("llama")
    path = str(folder / "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((135, 96), np.float32)
    save_file(tensors, path)
    assert_one_line_error(folder, path, "'model.layers.1.mlp.up_proj.weight' has shape (135, 96), expected (136, 96)")


def test_missing_tensor(copy_of):
    folder = copy_of("llama")
    path = str(folder / "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, path)
    assert_one_line_error(folder, str(folder), "'model.layers.2.self_attn.k_proj.weight' is missing")


def test_truncated_gguf(tiny_model, tmp_path):
    path = write_gguf(tiny_model("llama_gguf"), str(tmp_path / "m.gguf"))
    os.truncate(path, os.path.getsize(path) // 2)
    assert_one_line_error(path, path, "not a valid GGUF file, truncated or corrupted")


def test_corrupted_gguf(tiny_model, tmp_path):
    path = write_gguf(tiny_model("llama_gguf"), str(tmp_path / "m.gguf"))
    data = bytearray(open(path, "rb").read())
    data[0:4] = b"NOPE"  # magic
    open(path, "wb").write(bytes(data))
    assert_one_line_error(path, path, "not a valid GGUF file")
    data[0:4] = b"GGUF"
    data[16:24] = (10**15).to_bytes(8, "little")  # absurd metadata count
    open(path, "wb").write(bytes(data))
    assert_one_line_error(path, path, "not a valid GGUF file")


def test_not_a_model(tmp_path):
    (tmp_path / "nothing.bin").write_bytes(b"\0" * 64)
    assert_one_line_error(tmp_path / "nothing.bin", "nothing.bin", "not a model")
    assert_one_line_error(tmp_path / "missing.gguf", "model.path", "missing.gguf does not exist")
