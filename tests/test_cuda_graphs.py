"""CUDA graphs of decode steps (mpinfer/backend/cuda_graphs.py) on the stand-in GPU
(tests/fake_gpu.py), whose stream capture raises on what a real capture cannot hold
(host <-> device copies, synchronizations, host reads of device values, allocations the
graph's private pool has not made before) and whose replay recomputes the captured work on
the arrays' current contents. Graph and eager runs of the same requests must give the same
greedy tokens; planted bugs (a stale static buffer, a host upload inside the forward) must
be caught."""

import importlib
import os
import sys
import types

import numpy as np
import pytest

from test_cuda import fake_gpu  # noqa: F401  (the fixture)

LENS = [5, 17, 64, 3, 33, 270, 9, 40, 12, 7, 100]  # 270 + 40 tokens: a block table of 20 blocks, past MIN_WIDTH
NEW = [4, 30, 12, 40, 8, 20, 33, 1, 25, 16, 9]  # sequences finish mid-batch: 10 -> 1 rows, buckets 16 to 1


def generate(folder, graphs, lens=LENS, new=NEW, model=None):
    """Greedy tokens of prompts of lens tokens, new[i] each, all decoding together through
    Decoder.forward on the CUDA backend, in a KV pool of their own; (tokens per prompt, model)."""
    from mpinfer.backend import get_backend
    from mpinfer.kvcache import PagedKVCache
    from mpinfer.model import Decoder
    from mpinfer.weights import open_checkpoint

    model = model or Decoder(open_checkpoint(folder), get_backend("cuda"), graphs=graphs)
    be = model.be
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model.config.vocab_size, n) for n in lens]
    pool = PagedKVCache(len(model.blocks), model.kv_heads, model.config.head_dim, 200, 16, be)
    seqs = [pool.sequence() for _ in prompts]
    logits = model.forward(np.concatenate(prompts), seqs, [len(p) for p in prompts])
    tokens = [[int(np.argmax(row))] for row in logits]
    alive = [i for i in range(len(prompts)) if new[i] > 1]
    while alive:
        logits = model.forward([tokens[i][-1] for i in alive], [seqs[i] for i in alive], [1] * len(alive))
        for row, i in zip(logits, alive):
            tokens[i].append(int(np.argmax(row)))
        alive = [i for i in alive if len(tokens[i]) < new[i]]
    return tokens, model


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "llama_bias"])
def test_graph_decode_gives_the_eager_tokens(fake_gpu, tiny_model, arch):
    """llama: llama3 RoPE scaling; qwen3: q/k norm; mistral: sliding window; llama_bias: biases,
    tied head. Every decode step but the first of each bucket replays a graph."""
    folder = tiny_model(arch)
    eager, model = generate(folder, graphs=False)
    assert model.graphs is None
    before = fake_gpu.STATE.replays
    graphed, model = generate(folder, graphs=True)
    assert graphed == eager
    assert sorted(model.graphs.graphs) == [(1, 16), (2, 16), (4, 16), (8, 32), (16, 32)]
    assert all(g.logits is model.graphs.outputs[rows] for (rows, _), g in model.graphs.graphs.items())
    assert fake_gpu.STATE.replays - before == max(NEW) - 1  # every decode step
    again, _ = generate(folder, graphs=True, lens=LENS[::-1], new=NEW[::-1], model=model)  # a new KV pool
    assert again == generate(folder, graphs=False, lens=LENS[::-1], new=NEW[::-1])[0]


def test_which_models_get_graphs(fake_gpu, tiny_model):
    """Graphs only where a whole step can be captured: not for MoE layers (host routing
    bookkeeping), not on the NumPy backend, not when turned off. (Host-staged TP groups run
    eagerly in test_cuda's tp 2 jobs: a capture there would raise.)"""
    from mpinfer.backend import get_backend
    from mpinfer.model import Decoder
    from mpinfer.weights import open_checkpoint

    ckpt = open_checkpoint(tiny_model("llama"))
    assert Decoder(ckpt, get_backend("cuda")).graphs is not None
    assert Decoder(ckpt, get_backend("cuda"), graphs=False).graphs is None
    assert Decoder(ckpt, get_backend("numpy")).graphs is None
    assert Decoder(open_checkpoint(tiny_model("mixtral")), get_backend("cuda")).graphs is None


class _CountingGroup:
    """An NCCL group's stand-in for the counters: a sum over one rank (x itself), counted as
    comm.Group counts."""

    def __init__(self):
        self.counts = {}
        self.comm = types.SimpleNamespace(allreduce=lambda x, op=None: x)  # one rank's MPI communicator

    def all_reduce(self, x):
        c = self.counts.setdefault("all_reduce", {"calls": 0, "bytes": 0})
        c["calls"] += 1
        c["bytes"] += x.nbytes
        return x


def test_replays_count_their_collectives(fake_gpu, tiny_model):
    """A TP group's counters count what ran: with graphs, the same all-reduces as the eager
    steps (each replay the ones its capture recorded, the capture itself none) plus one
    warm-up pass per capture. (Their bytes differ: a replay sums its padded rows too.)"""
    from mpinfer.backend import get_backend
    from mpinfer.model import Decoder
    from mpinfer.weights import open_checkpoint

    cuda_graphs = importlib.import_module("mpinfer.backend.cuda_graphs")
    calls = []
    for graphs in (False, True):
        model = Decoder(open_checkpoint(tiny_model("llama")), get_backend("cuda"), graphs=False)
        model.tp.group = _CountingGroup()  # every row-parallel linear and the embedding all-reduce through it
        model.graphs = cuda_graphs.DecodeGraphs(model) if graphs else None
        generate(None, graphs, model=model)
        calls.append(model.tp.group.counts["all_reduce"]["calls"])
    per_pass = 2 * len(model.blocks) + 1
    assert calls[0] == per_pass * max(NEW) and calls[1] == calls[0] + per_pass * len(model.graphs.graphs)


def test_stale_static_buffer_is_caught(fake_gpu, tiny_model, monkeypatch):
    """A planted bug: the replays after a bucket's first keep its first step's kv_lens (a static
    buffer not refreshed). Attention then reads too few keys and the tokens go wrong."""
    cuda_graphs = importlib.import_module("mpinfer.backend.cuda_graphs")  # the stand-in's (not a stale attribute)
    folder = tiny_model("llama")
    eager, _ = generate(folder, graphs=False)
    pack, first = cuda_graphs.pack, {}

    def stale(ids, batch, rows, width):
        buf = pack(ids, batch, rows, width)
        kv_lens = first.setdefault((rows, width), buf[3 * rows : 4 * rows].copy())
        buf[3 * rows : 4 * rows] = kv_lens
        return buf

    monkeypatch.setattr(cuda_graphs, "pack", stale)
    graphed, _ = generate(folder, graphs=True)
    assert graphed != eager


def test_host_upload_in_the_forward_is_caught(fake_gpu, tiny_model, monkeypatch):
    """A planted bug: RoPE tables made on the host and uploaded in the forward (as before
    issue 10): a capture cannot hold the copy, the stand-in raises."""
    from mpinfer import rope
    from mpinfer.backend.cuda_backend import CudaBackend
    import cupy

    monkeypatch.setattr(CudaBackend, "rope_tables", lambda self, inv_freq, batch: tuple(
        cupy.asarray(a) for a in rope.cos_sin(inv_freq, batch.positions)))
    with pytest.raises(fake_gpu.CaptureError, match="host-to-device copy"):
        generate(tiny_model("llama"), graphs=True)


def test_stand_in_capture_rules(fake_gpu):
    """The stand-in's capture itself: what raises, and replay on current contents."""
    import cupy

    pool, stream = cupy.cuda.MemoryPool(), cupy.cuda.Stream()
    with cupy.cuda.using_allocator(pool.malloc):
        a = cupy.zeros(4, np.float32)
        (a * 2 + 1).sum()  # warm-up: the pool has made these sizes
        stream.begin_capture()
        b = a * 2 + 1
        c = b[1:3]  # a view: nothing recorded
        for bad, what in [(lambda: cupy.asarray(np.ones(4)), "host-to-device"), (lambda: cupy.asnumpy(b), "device-to-host"),
                          (stream.synchronize, "synchronization"), (lambda: float(b[0]), "device value"),
                          (lambda: cupy.empty(1000, np.float32), "has not made before"), (lambda: a.set(np.ones(4)),
                                                                                          "host-to-device")]:
            with pytest.raises(fake_gpu.CaptureError, match=what):
                bad()
        graph = stream.end_capture()
    with pytest.raises(fake_gpu.CaptureError, match="shared memory pool"):
        stream.begin_capture()
        try:
            cupy.empty(4, np.float32)
        finally:
            stream.end_capture()
    a.set(np.arange(4, dtype=np.float32))
    graph.launch()
    assert b.get().tolist() == [1, 3, 5, 7] and c.get().tolist() == [3, 5]


def test_job_with_graphs_equals_job_without(fake_gpu, tiny_model, tmp_path, monkeypatch):
    """mpinfer run through the scheduler (continuous batching, max_batch_tokens 64: prefill
    chunks and decodes share steps until the prompts are in, then decode-only steps replay
    graphs), engine.cuda_graphs on and off: the same rows."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_run import read_rows, write_job

    from mpinfer.engine.runner import run_job

    monkeypatch.setenv("OPENBLAS_NUM_THREADS", os.environ.get("OPENBLAS_NUM_THREADS", "1"))  # as the CLI sets it
    lines = [{"id": f"r{i}", "input_ids": list(range(3 + i, 3 + i + n)), "sampling": {"max_new_tokens": m}}
             for i, (n, m) in enumerate(zip(LENS, NEW))]
    outputs = []
    for graphs in (False, True):
        before = fake_gpu.STATE.replays
        job, out = write_job(tmp_path / str(graphs), tiny_model("qwen3"), lines,
                             engine={"backend": "cuda", "cuda_graphs": graphs})
        assert run_job(str(job), []) == 0
        assert (fake_gpu.STATE.replays > before) == graphs
        rows = read_rows(out)
        outputs.append({rows["id"][i]: list(rows["output_ids"][i]) for i in range(len(rows["id"]))})
    assert len(outputs[0]) == len(lines)
    for rid in outputs[0]:
        assert outputs[0][rid] == outputs[1][rid], rid


def test_bench_section_runs_on_the_stand_in(fake_gpu, tiny_model):
    """bench/gpu/e2e.graphs_and_throughput, the GPU check's graphs and throughput section, on the
    stand-in and transformers on the CPU: the harness itself (its figures mean nothing here)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu"))
    try:
        import e2e
    finally:
        sys.path.pop(0)
    r = e2e.graphs_and_throughput(tiny_model("llama"), copy_bw=1e9, prompts=6, prompt_len=20, new=12, decode_steps=8,
                                  hf_device="cpu")
    assert r["ok"] and r["batch1"]["tokens_equal"] == r["batch1"]["tokens"] == 12
    assert r["offline"]["graphs_vs_eager"] == {"equal": 6, "of": 6, "mean_prefix_fraction": 1.0}
    assert r["offline"]["ratio_vs_transformers"] > 0 and r["batch1"]["roofline_tok_s"] > 0


def test_a_failed_capture_turns_graphs_off(fake_gpu, tiny_model, capsys):
    """A capture the CUDA runtime refuses (planted: the capture raising its error) ends the
    capture cleanly, says so in one stderr line, and the step and every later one run eagerly
    with the eager tokens. Anything else raised there is a bug and is not swallowed."""
    import cupy

    folder = tiny_model("llama")
    eager, _ = generate(folder, graphs=False)
    _, model = generate(folder, graphs=True, lens=[3], new=[1])  # prefill only: nothing captured yet
    graphs = model.graphs
    real = type(graphs)._capture

    def refused(self, pool, rows, width):
        real(self, pool, rows, width)
        raise cupy.cuda.runtime.CUDARuntimeError("cudaErrorStreamCaptureUnsupported: operation not permitted")

    graphs._capture = refused.__get__(graphs)
    graphed, model = generate(folder, graphs=True, model=model)
    assert graphed == eager and model.graphs is None and graphs.graphs == {}
    err = capsys.readouterr().err
    assert err.count("CUDA graph capture failed, decode steps run eagerly: cudaErrorStreamCaptureUnsupported") == 1


def test_graphs_over_16_rows_of_a_q4_1_gguf(fake_gpu, tiny_model, tmp_path):
    """20 decoding sequences (bucket 32): the products on GGUF blocks take the dequantize +
    GEMM path inside the capture (gemv_q takes at most 16 rows), with the SwiGLU epilogue."""
    import gguf
    from gguf_writer import write_gguf

    path = write_gguf(tiny_model("llama_gguf"), str(tmp_path / "m.gguf"), gguf.GGMLQuantizationType.Q4_1)
    lens, new = [5 + 3 * i for i in range(20)], [6 + i % 5 for i in range(20)]
    eager, _ = generate(path, graphs=False, lens=lens, new=new)
    calls = sys.modules["mpinfer.backend.cuda_quant"].calls
    before = calls["dequantize"]
    graphed, model = generate(path, graphs=True, lens=lens, new=new)
    assert graphed == eager
    assert (32, 16) in model.graphs.graphs and calls["dequantize"] > before
