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
import json
import os
import signal
import threading
import time

from mpi4py import MPI

from .. import __version__, context
from ..backend import get_backend, kv_element_bytes, on_gpu
from ..errors import EXIT_BAD_INPUT, EXIT_OK, UserError
from ..io.fingerprint import fingerprint
from ..io.prompts import read_prompts
from ..io.results import ResultsFile, lock
from ..job import load_job
from ..kvcache import PagedKVCache
from ..layers import check_tp, kv_heads_per_rank
from ..mapping import stage_layers
from ..model import Decoder
from ..moe import EP, check_ep
from ..tokenizer import load_tokenizer
from ..costmodel import Workload
from ..planner import choose_layout
from ..topology import Topology, ranks_per_node
from ..weights import open_checkpoint
from . import dispatch, experts
from .lead import lead
from .pipeline import LocalPipe, Pipe, Replica, run_stage
from .scheduler import Scheduler


def run_job(job_file, overrides, skip_invalid=False, overwrite=False, comm=MPI.COMM_WORLD):
    """Run the job; returns the exit code, the same on every rank. Every rank calls it.
    Bad input raises UserError on rank 0 only (the CLI prints it once); the other ranks
    return EXIT_BAD_INPUT. SIGTERM, SIGUSR1 or SIGINT stop the job early but resumably."""
    t0 = time.perf_counter()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    job, setup, problem = None, None, None
    try:
        job = load_job(job_file, overrides)  # on every rank: a path may exist on one node only
    except UserError as e:
        problem = str(e)
    if _any_problem(comm, problem):
        return EXIT_BAD_INPUT
    try:
        if job.parallel.auto:
            job, problem = _auto_layout(job, comm)
    except ValueError as e:  # ranks per node that do not fit
        problem = f"{job.path}: [parallel]: {e}"
    if _any_problem(comm, problem):
        return EXIT_BAD_INPUT
    try:
        p = job.parallel
        topo = Topology(comm, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep)  # the same verdict on every rank
    except ValueError as e:
        problem = f"{job.path}: [parallel]: {e}"
    if _any_problem(comm, problem):
        return EXIT_BAD_INPUT
    if comm.rank == 0:
        try:
            setup = _prepare(job, topo, skip_invalid, overwrite)
        except UserError as e:
            problem = str(e)
    if _any_problem(comm, problem):
        return EXIT_BAD_INPUT
    if comm.rank == 0:
        m = topo.mapping  # the whole table for a few ranks, its summary line for many
        print(m.table() if m.world <= 32 else m.describe(), flush=True)
    if dispatch.allgather(comm, setup is not None and setup["results"].complete)[0]:
        if comm.rank == 0:
            print(f"mpinfer: {job.output_path} is already complete; nothing to run", flush=True)
        return EXIT_OK
    m, eng = topo.mapping, job.engine
    try:
        ckpt = setup["ckpt"] if comm.rank == 0 else open_checkpoint(job.model_path)
        tokenizer = setup["tokenizer"] if comm.rank == 0 else load_tokenizer(job.model_path, ckpt)
        # each rank reads only its slices: its TP part of its pipeline stage's layers
        be, ep = get_backend(eng.backend, comm), EP.of(topo, job.moe.capacity_factor)
        if be.name == "cuda" and job.parallel.cp > 1:
            raise UserError(f"{job.path}: engine.backend = 'cuda' does not run context parallelism yet; use "
                            "engine.backend = 'numpy' for parallel.cp > 1")
        model = Decoder(ckpt, be, topo.tp, m.layer_range(ckpt.config.num_layers), ep, job.parallel.cp_method,
                        job.parallel.sp, eng.cuda_graphs)
    except UserError as e:  # e.g. a weight file truncated after its header
        problem = str(e)
    if _any_problem(comm, problem):
        return EXIT_BAD_INPUT
    largest = _largest_stage(model.config.num_layers, m.pp)
    pool = PagedKVCache.for_model(model, eng.kv_cache_gb * 2**30, eng.block_size, largest)
    pool.cp = topo.cp
    moe = model.config.num_experts > 0
    if job.moe.hot_experts:  # before the job: rank 0's load figures, or a routing pass to make them
        hot = dispatch.bcast(comm, setup["hot"] if comm.rank == 0 else None)
        if "sample" in hot:
            mine = [dispatch.decode_request(d) for d in hot["sample"][m.dp_rank :: m.dp]]
            _run(job, model, tokenizer, pool, topo, stop, dispatch.ListQueue(mine))
            hot = {"load": {str(k): v["load"].tolist() for k, v in experts.gather(comm, model, m).items()}}
        experts.replicate(model, hot["load"], job.moe.hot_experts)
    loaded = dispatch.allgather(comm, _load_stats(model, pool, ckpt))  # what each rank holds: into the metrics
    try:
        if comm.rank == 0:
            replica = _replica(job, model, tokenizer, pool, topo, stop)
            return lead(job, setup, topo, replica, comm, stop, t0, loaded,
                        (lambda: experts.gather(comm, model, m)) if moe else None)
        _run(job, model, tokenizer, pool, topo, stop, dispatch.RemoteQueue(comm))
        if moe:
            experts.gather(comm, model, m)
        return dispatch.poll(comm, 0, dispatch.FINAL, block=True)[2]["code"]
    except UserError as e:  # after the start every failure ends the whole job (the CLI aborts)
        raise RuntimeError(str(e)) from None


def _auto_layout(job, comm):
    """parallel.auto: rank 0 asks the planner for the world's layout (ranks per node from MPI,
    memory per rank from the machine: a GPU's, or the node's memory shared by its ranks) and
    tells every rank; (job with that layout, problem or None)."""
    per_node = ranks_per_node(comm)  # collective
    choice = None
    if comm.rank == 0:
        try:
            cfg = open_checkpoint(job.model_path).config
            memory, item = _memory_per_rank(per_node, job.engine.backend)
            work = Workload(batch=job.engine.max_seqs, param_bytes=item, act_bytes=item)
            tp, pp, ep, cp, why = choose_layout(cfg, comm.size, per_node, memory, work)
            choice = {"tp": tp, "pp": pp, "ep": ep, "cp": cp}
            print(f"mpinfer: parallel.auto: tp {tp}, pp {pp}, ep {ep}, cp {cp} (the planner's h100 / NVLink / NDR "
                  f"presets, {memory / 2**30:.1f} GiB per rank)\n{why}", flush=True)
        except UserError as e:
            choice = {"problem": f"{job.path}: parallel.auto: {e}"}
    choice = dispatch.bcast(comm, choice)
    if "problem" in choice:
        return job, choice["problem"]
    return dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, **choice)), None


def _memory_per_rank(per_node, backend):
    """(bytes a rank may hold, bytes per weight and KV element): on GPUs a GPU's memory
    (shared by the ranks that share one) in bf16, else the node's memory shared by its
    ranks in float32 (the NumPy backend)."""
    if on_gpu(backend):
        import cupy

        gpus = cupy.cuda.runtime.getDeviceCount()
        return cupy.cuda.runtime.memGetInfo()[1] * gpus // max(per_node, gpus), kv_element_bytes(backend)
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    return total_kb * 1024 // per_node, kv_element_bytes(backend)


def _run(job, model, tokenizer, pool, topo, stop, queue):
    """This rank's part of a run (not rank 0's: lead.py): a later pipeline stage, or a rank of
    a replica's first stage, its TP leader taking requests from queue."""
    m = topo.mapping
    if m.pp_rank > 0:
        run_stage(model, pool, topo.pp)
    else:
        _replica(job, model, tokenizer, pool, topo, stop).run(queue if m.tp_rank == m.cp_rank == 0 else None)


def _replica(job, model, tokenizer, pool, topo, stop):
    """The first stage of a replica: micro_batches schedulers (1 without a pipeline) sharing
    the KV pool and the engine's limits; with EP across replicas, stepping with its EP group."""
    e, pp, m = job.engine, topo.pp, topo.mapping
    k = job.parallel.micro_batches or pp.size if pp.size > 1 else 1
    long_prompt = job.parallel.cp_threshold if m.cp > 1 else 0
    schedulers = [Scheduler(model, tokenizer, pool, e.max_batch_tokens, max(1, e.max_seqs // k), long_prompt)
                  for _ in range(k)]
    pipe = Pipe(model, pp) if pp.size > 1 else LocalPipe(model)
    lockstep = topo.ep if m.tp % m.ep else None
    return Replica(schedulers, pipe, topo.tp, stop, lockstep, topo.cp)


def _load_stats(model, pool, ckpt):
    """This rank after loading, in MiB: weights held, KV cache, peak resident memory, tensor
    bytes read from the checkpoint (a tensor-parallel or pipeline rank reads its slices)."""
    status = open("/proc/self/status").read()
    peak_kb = int(status.split("VmHWM:")[1].split()[0])
    return {"weights_mib": model.be.weight_bytes / 2**20, "kv_cache_mib": (sum(k.nbytes for k in pool.k) * 2) / 2**20,
            "peak_rss_mib": peak_kb / 1024, "read_mib": ckpt.bytes_read / 2**20}


def _largest_stage(num_layers, pp):
    """Layers of the largest pipeline stage: every stage's KV pool is sized for it."""
    return max(b - a for a, b in stage_layers(num_layers, pp))


def _any_problem(comm, problem):
    """Collective: True when some rank met bad input. Rank 0 raises the first problem, with
    the rank that met it when that is not rank 0; the other ranks just report True."""
    problems = [(rank, p) for rank, p in enumerate(dispatch.allgather(comm, problem)) if p is not None]
    if problems and comm.rank == 0:
        rank, p = problems[0]
        raise UserError(p if rank == 0 else f"rank {rank}: {p}")
    return bool(problems)


def _prepare(job, topo, skip_invalid, overwrite):
    ckpt = open_checkpoint(job.model_path)
    cfg = ckpt.config
    m = topo.mapping
    try:
        check_tp(cfg, job.parallel.tp)
        _check_cp(job.parallel, cfg)
        check_ep(cfg, m.ep, m.moe_tp)
    except UserError as e:
        raise UserError(f"{job.path}: {e}") from None
    experts.check(job, cfg)
    tokenizer = load_tokenizer(job.model_path, ckpt)
    requests = read_prompts(job.input_path, tokenizer, job.sampling, cfg.max_position, cfg.vocab_size, skip_invalid)
    _check_kv_capacity(job, cfg, requests)
    if job.shard:  # a job array task: its share of the lines, after every line was checked
        requests = [r for r in requests if job.shard.takes(r.index)]
    layout = {"world": m.world, "dp": m.dp, "tp": m.tp, "pp": m.pp, "ep": m.ep, "cp": m.cp,
              "ranks_per_node": m.ranks_per_node, "blas_threads_per_rank": int(os.environ["OPENBLAS_NUM_THREADS"])}
    attrs = {"mpinfer_version": __version__, "job": job.toml(), "layout": json.dumps(layout), "model": cfg.to_json()}
    lock(job.output_path)  # released when this process ends
    results = ResultsFile(job.output_path, fingerprint(job, cfg), attrs, overwrite)
    todo = [r for r in requests if r.index not in results.done]
    hot = None
    if job.moe.hot_experts:
        hot = ({"load": experts.load_from_file(job.moe.load_from, cfg)} if job.moe.load_from
               else {"sample": experts.routing_sample(requests)})
    return dict(ckpt=ckpt, tokenizer=tokenizer, results=results, total=len(requests), hot=hot,
                pending=[r for r in todo if r.error is None], invalid=[r for r in todo if r.error is not None])


def _check_cp(p, cfg):
    if p.cp == 1:
        return
    if p.sp:
        raise UserError(f"parallel.cp = {p.cp} with parallel.sp = true: choose one of them in this version")
    if p.ep > 1:
        raise UserError(f"parallel.cp = {p.cp} with parallel.ep = {p.ep}: context parallelism combines with "
                        "tp, pp and dp, not yet with ep")
    heads = cfg.num_heads // p.tp
    why = context.check_ulysses(heads, kv_heads_per_rank(cfg, p.tp), p.cp) if p.cp_method == "ulysses" else None
    if why:
        raise UserError(f"parallel.cp_method = \"ulysses\": {why}; use \"ring\"")


def _check_kv_capacity(job, cfg, requests):
    """Refuse, before any compute, a request that could never fit the replica's KV cache."""
    e = job.engine
    layers, kv_heads = _largest_stage(cfg.num_layers, job.parallel.pp), kv_heads_per_rank(cfg, job.parallel.tp)
    capacity = PagedKVCache.blocks_for_bytes(cfg, layers, kv_heads, e.kv_cache_gb * 2**30, e.block_size,
                                             kv_element_bytes(e.backend)) * e.block_size
    p = job.parallel
    for r in requests:
        need = min(len(r.prompt_ids) + r.sampling.max_new_tokens, cfg.max_position)
        if p.cp > 1 and len(r.prompt_ids) >= p.cp_threshold:  # sharded over the CP group (kvcache.py)
            need = -(-need // p.cp) + 3
        if r.error is None and need > capacity:
            raise UserError(f"{job.path}: engine.kv_cache_gb = {e.kv_cache_gb} holds {capacity} tokens per replica, "
                            f"but request {r.id!r} (line {r.index + 1}) may need {need}; raise engine.kv_cache_gb")

