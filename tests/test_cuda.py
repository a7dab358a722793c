"""The CUDA backend's checks that need no GPU: every kernel file compiles to an sm_90 cubin
(sm_90a for kernels.ARCH_SPECIFIC) through NVRTC (the cubin step runs ptxas, so bad inline
PTX fails here), the cubin cache, and the backend selection. The kernels' numbers are
checked on a GPU by bench/gpu/check.py."""

import os
import subprocess
import sys
import types

import numpy as np

import pytest

from mpinfer.backend import get_backend, kernels
from mpinfer.errors import UserError

BIN = os.path.dirname(sys.executable)

# one op per file (issue 7): if a file goes missing the list below says which
EXPECTED = {"attention_decode", "attention_prefill", "cast", "dequant", "embedding", "gemm", "gemm_wgmma", "gemv",
            "gemv_q", "kv_store", "moe_routing", "rmsnorm", "rope", "rope_kv_store", "sampling", "swiglu"}


def test_every_expected_kernel_file_exists():
    assert EXPECTED <= set(kernels.names())


@pytest.mark.parametrize("name", kernels.names())
def test_kernel_compiles_to_sm90_cubin(name):
    cubin = kernels.compile_cubin(name, kernels.arch(name, "90"))
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000
    source = (kernels.KERNELS / f"{name}.cu").read_text()
    assert source.lstrip().startswith(("//", "/*")), f"{name}.cu must open with its manual (a header comment)"
    assert 'extern "C"' in source


def test_bad_inline_ptx_fails_at_the_cubin_step(tmp_path, monkeypatch):
    (tmp_path / "common.cuh").write_text((kernels.KERNELS / "common.cuh").read_text())
    (tmp_path / "bad.cu").write_text('#include "common.cuh"\nextern "C" __global__ void k(float* x) {\n'
                                     '    asm volatile("not.an.instruction.f32 %0;" : "+f"(x[0]));\n}\n')
    monkeypatch.setattr(kernels, "KERNELS", tmp_path)
    with pytest.raises(kernels.KernelError, match="bad.cu"):
        kernels.compile_cubin("bad", "sm_90")


def test_cubin_cache_compiles_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MPINFER_KERNEL_CACHE", str(tmp_path))
    calls = []
    compile_ = kernels.compile_cubin
    monkeypatch.setattr(kernels, "compile_cubin", lambda *a: calls.append(a) or compile_(*a))
    first = kernels.cached_cubin("cast", "sm_90")
    again = kernels.cached_cubin("cast", "sm_90")
    assert first == again and first.parent == tmp_path and len(calls) == 1
    assert first.read_bytes()[:4] == b"\x7fELF"
    assert not list(tmp_path.glob("*.tmp"))


def _fake_cupy(monkeypatch, available):
    fake = types.ModuleType("cupy")
    fake.is_available = lambda: available
    monkeypatch.setitem(sys.modules, "cupy", fake)


def test_auto_is_numpy_without_a_gpu(monkeypatch):
    _fake_cupy(monkeypatch, available=False)
    assert get_backend("auto").name == "numpy"
    assert get_backend("numpy").name == "numpy"


def test_cuda_without_a_gpu_says_why(monkeypatch):
    _fake_cupy(monkeypatch, available=False)
    with pytest.raises(UserError, match=r"engine.backend = 'cuda': no usable GPU \(cupy.is_available\(\) is False"):
        get_backend("cuda")
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(UserError, match="CuPy is not installed"):
        get_backend("cuda")
    assert get_backend("auto").name == "numpy"


def test_unknown_backend():
    with pytest.raises(UserError, match="unknown backend 'rocm'"):
        get_backend("rocm")


# The CUDA backend's own code with the GPU replaced by tests/fake_gpu.py (cupy over NumPy,
# each kernel wrapper by its NumPy reference on the same bf16 bits).

@pytest.fixture
def fake_gpu(monkeypatch):
    sys.path.insert(0, os.path.dirname(__file__))
    import fake_gpu as fake

    for name, module in fake.modules().items():
        if module is None:
            monkeypatch.delitem(sys.modules, name, raising=False)
        else:
            monkeypatch.setitem(sys.modules, name, module)
    yield fake
    sys.path.remove(os.path.dirname(__file__))


def _e2e():
    sys.path.insert(0, str(kernels.KERNELS.parent / "bench" / "gpu"))
    try:
        import e2e
    finally:
        sys.path.pop(0)
    return e2e


@pytest.mark.parametrize("arch", ["llama_bias", "qwen3", "mistral", "mixtral"])
def test_cuda_backend_code_against_numpy(fake_gpu, tiny_model, arch):
    """8 prompts batched (prefill segments of 3 to 70 tokens, then batched decode), 8 greedy
    tokens against the NumPy backend on the same float32 checkpoint: every token that differs
    does so where NumPy's top two logits are closer than the backends' logits differ."""
    from mpinfer.backend.cuda_backend import CudaBackend

    r = _e2e().compare(tiny_model(arch), "cuda", new=8, lens=[5, 17, 64, 3, 33, 70, 9, 40])
    assert r["prefill_logits_rel_err"] < 5e-2  # bf16 weights and matmul inputs against float32 ones (tiny models: 2%)
    assert r["ok"], r["prompts"]  # after a first difference the rest of a prompt's tokens may differ
    be = get_backend("cuda")
    assert isinstance(be, CudaBackend) and be.kv_bytes == 2


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_cuda_backend_keeps_gguf_blocks(fake_gpu, tiny_model, tmp_path, qtype):
    """A GGUF model whose linears are all quantized runs from its blocks: the prefill products
    (T > 16) through dequantize + the bf16 GEMM, the decode steps (8 rows) through gemv_q,
    against the NumPy backend on the same file (float32 dequantized weights), as the bf16
    test above. The GPU holds the blocks' bytes for the linears, bf16 for the rest
    (embedding, norms), where NumPy holds float32 for everything."""
    import gguf
    from gguf_writer import write_gguf

    path = write_gguf(tiny_model("llama_gguf"), str(tmp_path / "m.gguf"), gguf.GGMLQuantizationType[qtype])
    r = _e2e().compare(path, "cuda", new=8, lens=[5, 17, 64, 3, 33, 70, 9, 40])
    calls = sys.modules["mpinfer.backend.cuda_quant"].calls
    assert calls["dequantize"] and calls["gemv_q"], calls
    assert r["prefill_logits_rel_err"] < 5e-2
    assert r["ok"], r["prompts"]
    from mpinfer.weights import open_checkpoint

    cfg = open_checkpoint(path).config
    D, I, L, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.head_dim
    linear = L * D * ((cfg.num_heads * 2 + cfg.num_kv_heads * 2) * Dh + 3 * I)  # q, o, k, v, gate, up, down
    other = cfg.vocab_size * D + (2 * L + 1) * D  # embedding (tied head), norms
    block_bytes = {"Q4_1": 20, "Q8_0": 34}[qtype]
    assert r["gpu_weight_bytes"] == linear // 32 * block_bytes + 2 * other
    assert r["numpy_weight_bytes"] == 4 * (linear + other)
    print(f"{qtype}: GPU weight bytes {r['gpu_weight_bytes']}, {r['gpu_weight_bytes'] / r['numpy_weight_bytes']:.3f} "
          f"of NumPy's float32; prefill logits rel err {r['prefill_logits_rel_err']:.1e}")


def _swiglu_err(fake, be, T, D, I, bias):
    """Relative error of be.swiglu_linear (the CUDA backend's: its weight and bias rows stored
    in swiglu_rows order, the GEMM epilogue's reference on the fake GPU) against the NumPy
    backend's linear then silu_mul on the [gate; up] rows, on the same bf16-rounded numbers."""
    from mpinfer.backend.numpy_backend import NumpyBackend

    rng = np.random.default_rng(T * I)
    x = rng.standard_normal((T, D)).astype(np.float32)
    w = (rng.standard_normal((2 * I, D)) * D**-0.5).astype(np.float32)  # [gate; up]
    b = rng.standard_normal(2 * I).astype(np.float32) if bias else None
    got = be.to_numpy(be.swiglu_linear(be.asarray(x), be.weight(be.swiglu_rows(w)),
                                       None if b is None else be.bias(be.swiglu_rows(b))))
    ref = NumpyBackend(threads=1)
    gate, up = np.split(ref.linear(fake.f32(fake.bf16_bits(x)), fake.f32(fake.bf16_bits(w)), b), 2, axis=-1)
    want = ref.silu_mul(gate, up)
    assert got.shape == want.shape == (T, I)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("T, D, I, bias", [(1, 64, 8, True), (5, 96, 136, False), (37, 40, 68, True)])
def test_swiglu_interleave_and_epilogue_equal_linear_then_silu_mul(fake_gpu, T, D, I, bias):
    from mpinfer.backend.cuda_backend import CudaBackend
    from mpinfer.backend.numpy_backend import NumpyBackend

    assert _swiglu_err(fake_gpu, CudaBackend(), T, D, I, bias) < 1e-6
    # the NumPy backend's swiglu_linear is the unfused pair, bit for bit
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((T, D), np.float32), rng.standard_normal((2 * I, D), np.float32), None
    be = NumpyBackend(threads=1)
    assert np.array_equal(be.swiglu_linear(x, be.swiglu_rows(w), b), be.silu_mul(*np.split(be.linear(x, w), 2, axis=1)))


def test_swiglu_check_catches_a_wrong_pairing(fake_gpu, monkeypatch):
    """The check above fails for weights stored in any other pairing: gate_i with up_(i+1),
    gate and up swapped, or not interleaved at all."""
    from mpinfer.backend.cuda_backend import CudaBackend

    be, I = CudaBackend(), 68
    right = be.swiglu_rows
    wrong = [lambda a: right(np.concatenate([a[:I], np.roll(a[I:], -1, axis=0)])),
             lambda a: right(np.concatenate([a[I:], a[:I]])), lambda a: a]
    for rows in wrong:
        monkeypatch.setattr(be, "swiglu_rows", rows)
        assert _swiglu_err(fake_gpu, be, 7, 40, I, True) > 0.1


def _fake_job(ranks, job, **env):
    cmd = [os.path.join(BIN, "mpiexec"), "-n", str(ranks), sys.executable, os.path.join(os.path.dirname(__file__),
                                                                                           "fake_gpu.py"), "run", str(job)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


@pytest.mark.parametrize("arch, layouts", [("llama", [(2, {"tp": 2}), (2, {"pp": 2}), (4, {"tp": 2, "pp": 2}),
                                                     (2, {"tp": 2, "sp": True})]),
                                           ("mixtral", [(2, {"tp": 2, "ep": 2}), (4, {"tp": 2, "ep": 4})]),
                                           ("llama_gguf.Q4_1", [(2, {"tp": 2})])])
def test_cuda_backend_jobs_under_mpi(fake_gpu, tiny_model, tmp_path, arch, layouts):
    """mpinfer run with engine.backend = "cuda" (the stand-in GPU, one for all ranks, so TP
    groups are host-staged MPI as on the one-GPU test machine), max_batch_tokens 64 so that
    prefill chunks and decode steps share steps. Every layout gives one rank's rows up to
    bf16 rounding: matmul inputs are rounded to bf16, so a 1e-7 change in a sum (the TP
    all-reduce adds in another order) can move an activation by one bf16 step. Hence each
    request's tokens equal one rank's up to a first difference, only where one rank's top
    two log-probabilities are within 0.3 (the tiny models' bf16 noise on logits), and the
    log-probabilities before it agree within 0.1. "arch.QTYPE": that model as a GGUF
    quantized QTYPE, its linears kept in their blocks (under tp 2 the column-parallel ones;
    the row-parallel slices of 48 and 80 columns are not whole 32-blocks: bf16)."""
    from test_run import read_rows, write_job

    if "." in arch:
        import gguf
        from gguf_writer import write_gguf

        name, qtype = arch.split(".")
        model = write_gguf(tiny_model(name), str(tmp_path / "m.gguf"), gguf.GGMLQuantizationType[qtype], vocab=True)
    else:
        model = tiny_model(arch)
    lines = [{"id": f"r{i}", "input_ids": list(range(3 + i, 3 + i + n))} for i, n in enumerate([5, 40, 90, 7, 12, 130])]
    outputs = []
    for ranks, parallel in [(1, {}), *layouts]:
        job, out = write_job(tmp_path / f"{ranks}-{len(outputs)}", model, lines, engine={"backend": "cuda"},
                             parallel=parallel, sampling={"logprobs": 2})
        p = _fake_job(ranks, job)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        rows = read_rows(out)
        outputs.append({rows["id"][i]: (np.array(rows["output_ids"][i]), np.array(rows["top_logprobs"][i]).reshape(-1, 2))
                        for i in range(len(rows["id"]))})
    assert len(outputs[0]) == len(lines)
    equal = 0
    for got in outputs[1:]:
        for rid, (ids, top) in outputs[0].items():
            other_ids, other_top = got[rid]
            differ = np.flatnonzero(ids != other_ids)
            p = differ[0] if len(differ) else len(ids)
            equal += not len(differ)
            assert np.allclose(top[:p], other_top[:p], atol=0.1), (rid, top[:p], other_top[:p])
            if len(differ):
                assert top[p, 0] - top[p, 1] < 0.3, (rid, p, top[p])
    assert equal >= len(lines) * len(layouts) // 2  # most requests are identical all the way


def test_auto_layout_plans_with_the_gpu_memory(fake_gpu, tiny_model, tmp_path):
    """parallel.auto on GPUs plans with the GPU's memory (two ranks sharing the stand-in's one
    80 GiB GPU: 40 GiB each) and bf16, not the host's memory and float32."""
    from test_run import write_job

    job, out = write_job(tmp_path, tiny_model("llama"), [{"id": "a", "input_ids": [5, 6, 7]}],
                         engine={"backend": "cuda"}, parallel={"auto": True})
    done = _fake_job(2, job)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "40.0 GiB per rank" in done.stdout, done.stdout


def test_kv_capacity_check_counts_bf16_on_gpus(fake_gpu, tiny_model, tmp_path):
    """The up-front check that every request fits the KV cache sizes it as the backend will
    allocate it: bf16 (2 bytes) on GPUs holds twice the float32 tokens of the NumPy backend."""
    from test_run import write_job

    from mpinfer.config import load_hf_config
    from mpinfer.engine import runner
    from mpinfer.job import load_job

    folder = tiny_model("llama")
    cfg = load_hf_config(folder)
    per_token_f32 = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    need = 300  # tokens: 290 of prompt + 10 new
    gb = 200 * per_token_f32 / 2**30  # float32: 200 tokens (< need); bf16: 400 (> need)
    for backend, fits in (("numpy", False), ("cuda", True)):
        job_file, _ = write_job(tmp_path, folder, [{"id": "a", "input_ids": [5] * (need - 10)}],
                                engine={"backend": backend, "kv_cache_gb": gb, "block_size": 16})
        job = load_job(str(job_file))
        requests = [types.SimpleNamespace(id="a", index=0, error=None, prompt_ids=[5] * (need - 10),
                                          sampling=types.SimpleNamespace(max_new_tokens=10))]
        if fits:
            runner._check_kv_capacity(job, cfg, requests)
        else:
            with pytest.raises(UserError, match="holds 192 tokens per replica"):
                runner._check_kv_capacity(job, cfg, requests)
