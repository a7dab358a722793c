"""`mpinfer run`: a job on every rank of COMM_WORLD, each rank a data-parallel replica.

Order of events, so that bad input costs nothing and a killed job loses at most one flush
interval of work:
  1. rank 0 reads the model's config and tokenizer, validates the whole prompt file and
     opens the results file (refusing one from another job); every rank learns the outcome;
  2. every rank loads the weights and runs its replica (scheduler.py), pulling requests
     from rank 0's queue (dispatch.py);
  3. rank 0's service thread writes finished requests to the results file at least every
     engine.flush_seconds and shows progress; at the end rank 0 sorts the file, stores the
     metrics and marks it complete.
"""

import dataclasses
import hashlib
import json
import os
import time

import numpy as np
from mpi4py import MPI

from .. import __version__
from ..backend import get_backend
from ..errors import EXIT_BAD_INPUT, EXIT_OK, UserError
from ..io.prompts import read_prompts
from ..io.results import ResultsFile, read_rows
from ..kvcache import PagedKVCache
from ..model import Decoder
from ..tokenizer import load_tokenizer
from ..weights import open_checkpoint
from . import dispatch
from .progress import Progress
from .scheduler import Scheduler


def run_job(job, ranks_per_node, skip_invalid=False, overwrite=False, comm=MPI.COMM_WORLD):
    """Run the job; returns the exit code. Every rank calls it."""
    t0 = time.perf_counter()
    setup, problem = None, None
    if comm.rank == 0:
        try:
            setup = _prepare(job, ranks_per_node, skip_invalid, overwrite, comm)
        except UserError as e:
            problem = str(e)
    if _any_problem(comm, problem):
        return EXIT_BAD_INPUT
    nothing_to_do = dispatch.allgather(comm, setup is not None and setup["results"].complete)[0]
    if nothing_to_do:
        if comm.rank == 0:
            print(f"mpinfer: {job.output_path} is already complete; nothing to run", flush=True)
        return EXIT_OK

    try:
        ckpt = setup["ckpt"] if comm.rank == 0 else open_checkpoint(job.model_path)
        tokenizer = setup["tokenizer"] if comm.rank == 0 else load_tokenizer(job.model_path, ckpt)
        model = Decoder(ckpt, get_backend(job.engine.backend))
    except UserError as e:  # e.g. a weight file truncated after its header
        problem = str(e) if comm.rank == 0 else f"rank {comm.rank}: {e}"
    if _any_problem(comm, problem):
        return EXIT_BAD_INPUT
    pool = PagedKVCache.for_bytes(model.config, job.engine.kv_cache_gb * 2**30, job.engine.block_size)
    scheduler = Scheduler(model, tokenizer, pool, job.engine.max_batch_tokens, job.engine.max_seqs)
    if comm.rank != 0:
        _replica(scheduler, dispatch.RemoteQueue(comm), job.engine.max_seqs)
        dispatch.poll(comm, 0, dispatch.FINAL, block=True)
        return EXIT_OK
    return _lead(job, setup, scheduler, comm, t0)


def _any_problem(comm, problem):
    """Collective: True when some rank met bad input. Rank 0 raises the first problem (the
    CLI prints it once); the other ranks just report True."""
    problems = [p for p in dispatch.allgather(comm, problem) if p is not None]
    if problems and comm.rank == 0:
        raise UserError(problems[0])
    return bool(problems)


def _prepare(job, ranks_per_node, skip_invalid, overwrite, comm):
    for key, value in dataclasses.asdict(job.parallel).items():
        if value != 1:  # data parallel only, until the model is split over ranks
            raise UserError(f"{job.path}: parallel.{key} = {value}: only data parallelism (tp = pp = ep = cp = 1) "
                            "is available in this version")
    ckpt = open_checkpoint(job.model_path)
    cfg = ckpt.config
    tokenizer = load_tokenizer(job.model_path, ckpt)
    requests = read_prompts(job.input_path, tokenizer, job.sampling, cfg.max_position, cfg.vocab_size, skip_invalid)
    _check_kv_capacity(job, cfg, requests)
    fingerprint = {"model": _model_identity(job.model_path, cfg), "prompts": _sha256(job.input_path),
                   "sampling": dataclasses.asdict(job.sampling)}
    layout = {"world": comm.size, "dp": comm.size, "tp": 1, "pp": 1, "ep": 1, "cp": 1,
              "ranks_per_node": ranks_per_node, "blas_threads_per_rank": int(os.environ.get("OPENBLAS_NUM_THREADS", 0))}
    attrs = {"mpinfer_version": __version__, "job": job.toml(), "layout": json.dumps(layout), "model": cfg.to_json()}
    results = ResultsFile(job.output_path, fingerprint, attrs, overwrite)
    todo = [r for r in requests if r.index not in results.done]
    return dict(ckpt=ckpt, tokenizer=tokenizer, results=results, total=len(requests),
                pending=[r for r in todo if r.error is None], invalid=[r for r in todo if r.error is not None])


def _check_kv_capacity(job, cfg, requests):
    """Refuse, before any compute, a request that could never fit the replica's KV cache."""
    e = job.engine
    capacity = PagedKVCache.blocks_for_bytes(cfg, e.kv_cache_gb * 2**30, e.block_size) * e.block_size
    for r in requests:
        need = min(len(r.prompt_ids) + r.sampling.max_new_tokens, cfg.max_position)
        if r.error is None and need > capacity:
            raise UserError(f"{job.path}: engine.kv_cache_gb = {e.kv_cache_gb} holds {capacity} tokens per replica, "
                            f"but request {r.id!r} (line {r.index + 1}) may need {need}; raise engine.kv_cache_gb")


def _lead(job, setup, scheduler, comm, t0):
    """Rank 0: its own replica on the main thread, the queue and the writer on a service thread."""
    results = setup["results"]
    progress = Progress(setup["total"], len(results.done))
    state = {"done": len(results.done), "last_flush": time.perf_counter()}

    def on_records(records):
        results.add(records)
        state["done"] += len(records)

    def tick():
        now = time.perf_counter()
        progress.update(state["done"], sum(dispatcher.generated))
        if now - state["last_flush"] >= max(job.engine.flush_seconds, 10 * results.last_flush_s):
            results.flush(now - t0)
            state["last_flush"] = time.perf_counter()

    dispatcher = dispatch.Dispatcher(comm, setup["pending"], on_records, tick)
    on_records([_error_record(r) for r in setup["invalid"]])
    startup = time.perf_counter() - t0  # validation and model load, before the first step
    dispatcher.thread.start()
    _replica(scheduler, dispatch.LocalQueue(dispatcher), job.engine.max_seqs)
    dispatcher.thread.join()
    if dispatcher.error is not None:
        raise dispatcher.error
    progress.update(state["done"], sum(dispatcher.generated))
    progress.close()
    results.flush(time.perf_counter() - t0)
    wall = results.wall_s_before + time.perf_counter() - t0
    metrics = {**_metrics(read_rows(job.output_path), wall), "startup_s": startup}
    results.finish(time.perf_counter() - t0, metrics)
    requests = [dispatch.isend(comm, {}, r, dispatch.FINAL) for r in range(1, comm.size)]
    for request, _ in requests:
        dispatch.wait(request)
    print(f"mpinfer: wrote {job.output_path}: {state['done']} requests, {metrics['generated_tokens']} tokens, "
          f"{metrics['throughput_tok_s']:.1f} tok/s", flush=True)
    return EXIT_OK


def _replica(scheduler, queue, max_seqs):
    """One replica's loop: keep a few requests queued beyond the running ones, step until
    the queue is drained and everything taken is finished."""
    low_water = max(4, max_seqs // 8)
    while True:
        room = max_seqs - len(scheduler.running) - len(scheduler.waiting)
        if not queue.drained and len(scheduler.waiting) < low_water and room > 0:
            scheduler.add(queue.take(room, block=scheduler.idle))
        if scheduler.idle:
            if queue.drained:
                break
            continue
        finished = scheduler.step()
        if finished:
            queue.put(finished, scheduler.generated)
    queue.close(scheduler.generated)


def _error_record(r):
    return dict(id=r.id, index=r.index, prompt_ids=np.zeros(0, np.int32), output_ids=[], output_text="", logprobs=[],
                top_logprob_ids=[], top_logprobs=[], finish_reason="error", error=r.error, ttft_s=0.0, latency_s=0.0)


def _metrics(rows, wall_s):
    """Run metrics over every finished request in the file (earlier runs included)."""
    ok = [i for i, reason in enumerate(rows["finish_reason"]) if reason != "error"]
    n_out = np.array([len(rows["output_ids"][i]) for i in ok], dtype=np.int64)
    ttft = np.array([rows["ttft_s"][i] for i in ok])
    latency = np.array([rows["latency_s"][i] for i in ok])
    multi = n_out > 1
    tpot = (latency[multi] - ttft[multi]) / (n_out[multi] - 1)
    m = {"requests": len(ok), "generated_tokens": int(n_out.sum()),
         "prompt_tokens": int(sum(len(rows["prompt_ids"][i]) for i in ok)),
         "throughput_tok_s": float(n_out.sum() / wall_s) if wall_s > 0 else 0.0}
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        for q in (50, 90, 99):
            m[f"{name}_p{q}_s"] = float(np.percentile(values, q)) if len(values) else 0.0
    return m


def _model_identity(path, cfg):
    """What makes two models the same for resuming: the config and the files' names and sizes
    (hashing tens of GB of weights at every start would cost minutes)."""
    files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
    return {"config": json.loads(cfg.to_json()),
            "files": [[os.path.basename(f), os.path.getsize(f)] for f in files if os.path.isfile(f)]}


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
