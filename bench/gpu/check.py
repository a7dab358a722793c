"""The GPU check: every kernel against the NumPy backend, timed next to its baseline; whole
models end to end against the NumPy backend; NCCL; a TP=2 job of 2 MPI ranks on one GPU.
Writes a JSON report (bench/gpu/run.sh runs it on the GPU machine and keeps the report).

    python bench/gpu/check.py OUT.json [--quick] [SECTION ...]   (default: every section)

Sections run in order and each catches its own failure, so one broken kernel still leaves
a report of the rest. The last lines printed are a summary table.
"""

import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]

import cupy  # noqa: E402

import e2e  # noqa: E402
import models  # noqa: E402
from util import copy_bandwidth, time_us  # noqa: E402

AREAS = ["elementwise", "rope", "gemm", "attention", "routing", "quant"]
WORK = Path(os.environ.get("MPINFER_GPU_WORK", "/tmp/mpinfer-gpu"))
GRAPH_LAYERS = 4  # layers of the 8B-shaped model of the graphs / throughput section (sized for under ~90 s; not yet timed on a GPU)


def device_info():
    props = cupy.cuda.runtime.getDeviceProperties(0)
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    us = time_us(lambda: torch.matmul(a, b), warmup=3, repeat=10)
    return {"name": props["name"].decode(), "sms": props["multiProcessorCount"],
            "memory_gib": props["totalGlobalMem"] / 2**30, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "driver": cupy.cuda.runtime.driverGetVersion(), "cupy": cupy.__version__, "torch": torch.__version__,
            "copy_bandwidth_GBps": copy_bandwidth() / 1e9, "torch_bf16_matmul_8192_tflops": 2 * 8192**3 / us / 1e6}


def compile_all():
    """Every kernel file to a cubin for this device, with NVRTC's time, on 8 threads (the cache
    folder starts empty, so each file compiles here once and every later section loads it)."""
    from concurrent.futures import ThreadPoolExecutor

    from mpinfer.backend import kernels as k

    cc = cupy.cuda.Device().compute_capability

    def build(name):
        t = time.perf_counter()
        try:
            k.cached_cubin(name, k.arch(name, cc))
            return name, {"ok": True, "seconds": time.perf_counter() - t}
        except Exception as e:
            return name, {"ok": False, "error": str(e)[-2000:]}

    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        out = dict(pool.map(build, k.names()))
    return {"arch": f"sm_{cc}", "files": out, "wall_s": time.perf_counter() - t, "ok": all(v["ok"] for v in out.values())}


def wgmma_probe():
    """The backend's Hopper GEMM (gemm_wgmma.cu) on a few shapes in a child process first: a
    kernel that traps or faults takes its process's CUDA context with it. When the probe
    fails, MPINFER_NO_WGMMA=1 puts the rest of this run (and its child jobs) on mma.sync."""
    if cupy.cuda.Device().compute_capability != "90":
        return {"ok": True, "skipped": "not a Hopper GPU"}
    code = "import json, numpy, check_gemm; print(json.dumps(check_gemm.probe(numpy.random.default_rng(0))))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
        rows = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else []
        out = {"rc": p.returncode, "rows": rows, "tail": (p.stdout + p.stderr)[-1500:]}
    except subprocess.TimeoutExpired:
        rows, out = [], {"rc": "timed out after 120 s"}
    out["ok"] = bool(rows) and all(r["ok"] for r in rows)
    if not out["ok"]:
        os.environ["MPINFER_NO_WGMMA"] = "1"
        out["fallback"] = "MPINFER_NO_WGMMA=1: the rest of this run uses mma.sync"
    return out


def kernels(rng):
    rows = []
    for area in AREAS:
        t = time.perf_counter()
        try:
            got = importlib.import_module(f"check_{area}").run(rng)
        except Exception:
            got = [{"kernel": f"{area} (module)", "ok": False, "error": traceback.format_exc(limit=4)}]
        for r in got:
            r["area"] = area
        rows += got
        print(f"check_{area}: {sum(r.get('ok', False) for r in got)}/{len(got)} ok in {time.perf_counter() - t:.1f} s",
              flush=True)
    return rows


def nccl():
    """An NCCL group of one rank (NCCL refuses two ranks on one GPU, and this machine has one)."""
    from mpi4py import MPI

    from mpinfer.backend.cuda_comm import NcclGroup
    from mpinfer.comm import Group

    g = NcclGroup(Group(MPI.COMM_SELF, "tp"))
    x = cupy.random.standard_normal(1 << 20, dtype=np.float32)
    before = x.copy()
    g.all_reduce(x)
    cupy.cuda.get_current_stream().synchronize()
    return {"transport": g.transport, "all_reduce_equal": bool((x == before).all()), "ok": bool((x == before).all())}


def tp2_job(folder, backend="cuda"):
    """mpiexec -n 2 with tp = 2 on the one GPU (MPI groups, host-staged) against 1 rank, same job."""
    prompts = WORK / "tp2.jsonl"
    rng = np.random.default_rng(1)
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "input_ids": rng.integers(3, 1000, n).tolist()}) + "\n"
                               for i, n in enumerate([7, 30, 120, 5, 64, 200])))
    out = {}
    for ranks in (1, 2):
        job = WORK / f"tp{ranks}.toml"
        h5 = WORK / f"tp{ranks}.h5"
        h5.unlink(missing_ok=True)
        job.write_text(f'[model]\npath = "{folder}"\n[input]\npath = "{prompts}"\n[output]\npath = "{h5}"\n'
                       f'[sampling]\nmax_new_tokens = 24\n[engine]\nbackend = "{backend}"\nkv_cache_gb = 2\n'
                       f'[parallel]\ntp = {ranks}\n')
        t = time.perf_counter()
        p = subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, "-m", "mpinfer", "run", str(job)],
                           capture_output=True, text=True, timeout=150, cwd=ROOT)
        out[f"ranks{ranks}"] = {"rc": p.returncode, "seconds": time.perf_counter() - t,
                                "tail": (p.stdout + p.stderr)[-1500:]}
        if p.returncode == 0:
            from mpinfer.io.results import read_rows

            rows = read_rows(h5)
            out[f"ranks{ranks}"]["tokens"] = {rows["id"][i]: list(map(int, rows["output_ids"][i]))
                                              for i in range(len(rows["id"]))}
    a, b = out["ranks1"].get("tokens"), out["ranks2"].get("tokens")
    out["ok"] = a is not None and a == b
    return out


def main(path, quick=False, only=()):
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node()}
    t0 = time.perf_counter()
    smol, big, small = WORK / "smollm2-shaped", WORK / "llama3-8b-shaped-2layers", WORK / "tp2-model"
    graphs = WORK / f"llama3-8b-shaped-{GRAPH_LAYERS}layers"
    sections = [("device", device_info), ("compile", compile_all), ("wgmma_probe", wgmma_probe),
                ("e2e_smollm2_shaped", lambda: e2e.compare(models.write_model(smol, models.SMOLLM2), "cuda")),
                # the GPU from the Q4_1 blocks (linears W4A16), NumPy from their float32 values
                ("e2e_smollm2_shaped_q4_1", lambda: e2e.compare(models.write_gguf(WORK / "smollm2-shaped.Q4_1.gguf",
                                                                                  models.SMOLLM2), "cuda")),
                ("kernels", lambda: kernels(np.random.default_rng(int(time.time())))), ("nccl", nccl)]
    if not quick:
        sections += [("tp2_job", lambda: tp2_job(models.write_model(small, models.TP2))),
                     ("e2e_llama3_8b_shaped", lambda: e2e.compare(
                         models.write_model(big, dict(models.LLAMA3_8B, num_hidden_layers=2)), "cuda")),
                     ("e2e_llama3_8b_graphs", lambda: e2e.graphs_and_throughput(models.write_model(
                         graphs, dict(models.LLAMA3_8B, num_hidden_layers=GRAPH_LAYERS), device="cuda"),
                         copy_bandwidth()))]
    if only:
        sections = [(n, f) for n, f in sections if n in only]
    for name, fn in sections:
        t = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:
            report[name] = {"ok": False, "error": traceback.format_exc(limit=6)}
        print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
        Path(path).write_text(json.dumps(report, indent=1, default=str))
    report["seconds"] = time.perf_counter() - t0
    Path(path).write_text(json.dumps(report, indent=1, default=str))
    summary(report)


def summary(report):
    print(f"\n{report.get('device', {}).get('name', '?')}  copy "
          f"{report.get('device', {}).get('copy_bandwidth_GBps', 0):.0f} GB/s")
    for r in report.get("kernels", []):
        if isinstance(r, dict):
            timing = " ".join(f"{k}={r[k]:.3g}" for k in ("us", "ratio", "mma_sync_ratio", "bw_frac")
                              if isinstance(r.get(k), (int, float)))
            err = r.get("rel_err", r.get("mismatches", ""))
            print(f"{'ok ' if r.get('ok') else 'BAD'} {r.get('kernel', '?'):28.28} {str(r.get('shape', '')):34.34} "
                  f"err={err if isinstance(err, str) else f'{err:.2e}'} {timing}"
                  + (f" ERROR {r['error'][-200:]!r}" if r.get("error") else ""))
    g = report.get("e2e_llama3_8b_graphs", {})
    for part in ("batch1", "offline"):
        if isinstance(g.get(part), dict):
            print(f"e2e_llama3_8b_graphs {part}:", {k: v for k, v in g[part].items() if not isinstance(v, dict)})
    for name in ("compile", "wgmma_probe", "nccl", "e2e_smollm2_shaped", "e2e_smollm2_shaped_q4_1", "e2e_llama3_8b_shaped",
                 "tp2_job", "e2e_llama3_8b_graphs"):
        s = report.get(name, {})
        brief = {k: s[k] for k in ("ok", "tokens_equal", "tokens_total", "prefill_logits_rel_err", "gpu_generate_s",
                                   "numpy_generate_s", "gpu_weight_bytes", "transport", "fallback") if k in s}
        print(name, brief, (s.get("error") or "")[-600:])


if __name__ == "__main__":
    main(sys.argv[1], quick="--quick" in sys.argv, only=[a for a in sys.argv[2:] if not a.startswith("--")])
