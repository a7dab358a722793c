"""Rank 0 during a job: its own replica on the main thread, the request queue on the
dispatch thread (dispatch.py), the results file on a writer thread, and the end of the job:
final flush, metrics, `complete`, and the exit code every rank returns."""

import json
import os
import queue
import threading
import time

import numpy as np

from ..errors import EXIT_OK, EXIT_RESUMABLE
from ..io.results import request_metrics
from . import dispatch, experts
from .progress import Progress


class Writer(threading.Thread):
    """Adds finished requests to the results file and flushes at least every flush_seconds,
    and no more often than 10x the last flush took (a flush copies the whole file)."""

    def __init__(self, results, flush_seconds, t0):
        super().__init__(name="mpinfer-writer", daemon=True)
        self.results, self.flush_seconds, self.t0 = results, flush_seconds, t0
        self.inbox = queue.Queue()
        self.error = None

    def run(self):
        try:
            last = time.perf_counter()
            while (records := self.inbox.get()) is not None:
                self.results.add(records)
                while True:  # everything already waiting, then flush if due
                    try:
                        more = self.inbox.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        return
                    self.results.add(more)
                now = time.perf_counter()
                if now - last >= max(self.flush_seconds, 10 * self.results.last_flush_s):
                    self.results.flush(now - self.t0)
                    last = time.perf_counter()
        except BaseException as e:  # the main thread sees it and aborts the job
            self.error = e

    def close(self):
        self.inbox.put(None)
        self.join()
        if self.error is not None:
            raise RuntimeError("the results writer failed") from self.error


def lead(job, setup, topo, replica, comm, stop, t0, loaded, gather_moe=None):
    """Rank 0's part of run_job; returns the exit code (sent to every rank). replica:
    pipeline.Replica, rank 0's own; topo: its Topology (the leaders of all replicas are the
    ranks of its data-parallel group); loaded: every rank's memory and bytes read at load;
    gather_moe: for an MoE model, the collective that sums every rank's expert counts."""
    results, total = setup["results"], setup["total"]
    progress = Progress(total, len(results.done))
    writer = Writer(results, job.engine.flush_seconds, t0)
    done = [len(results.done)]  # requests in the file or on their way there

    def on_records(records):  # dispatch thread
        writer.inbox.put(records)
        done[0] += len(records)

    def tick():  # dispatch thread, every loop
        progress.update(done[0], sum(dispatcher.generated))

    dispatcher = dispatch.Dispatcher(comm, setup["pending"], on_records, tick, stop, topo.mapping.dp_group)
    writer.start()
    on_records([error_record(r) for r in setup["invalid"]])
    startup = time.perf_counter() - t0  # validation and model load, before the first step
    dispatcher.thread.start()
    replica.run(dispatch.LocalQueue(dispatcher))
    dispatcher.thread.join()
    if dispatcher.error is not None:
        raise RuntimeError("the dispatch thread failed") from dispatcher.error
    writer.close()
    progress.update(done[0], sum(dispatcher.generated))
    progress.close()
    moe = {}
    if gather_moe is not None:  # this run's counts added to the file's
        results.set_arrays({**results.arrays, **experts.arrays(gather_moe(), results.arrays)})
        moe = experts.metrics(results.arrays)
    if results.rows < total:  # stopped by a signal: what is finished goes to the file
        results.flush(time.perf_counter() - t0)
        code = EXIT_RESUMABLE
        print(f"mpinfer: stopped early; {results.rows_written} of {total} requests are in {job.output_path}; "
              "run the same job again to continue", flush=True)
    else:
        elapsed = time.perf_counter() - t0  # wall_s and the throughput from the same clock reading
        extra = {"startup_s": startup, "ranks.loaded": json.dumps(loaded),  # per rank: weights, KV, peak RSS, read (MiB)
                 **{f"comm.{k}": v for k, v in topo.counters().items()}, **moe}  # rank 0's groups
        if topo.pp.size > 1:  # how busy each stage of rank 0's pipeline was while it ran
            busy = np.array(replica.pipe.stage_busy_s)
            extra |= {"pp.micro_batches": len(replica.schedulers), "pp.stage_busy_s": json.dumps(busy.tolist()),
                      "pp.idle_fraction": float(1 - busy.mean() / replica.run_s)}
        metrics = results.finish(elapsed, lambda rows: {**_metrics(rows, results.wall_s_before + elapsed), **extra})
        os.remove(job.output_path + ".lock")  # still held: no other run can be waiting on it
        code = EXIT_OK
        print(f"mpinfer: wrote {job.output_path}: {total} requests, {metrics['generated_tokens']} tokens, "
              f"{metrics['throughput_tok_s']:.1f} tok/s", flush=True)
    for request in [dispatch.isend(comm, {"code": code}, r, dispatch.FINAL) for r in range(1, comm.size)]:
        request.wait()
    return code


def error_record(r):
    """The results row of an invalid prompt line (--skip-invalid)."""
    return dict(id=r.id, index=r.index, prompt_ids=np.zeros(0, np.int32), output_ids=[], output_text="", logprobs=[],
                top_logprob_ids=[], top_logprobs=[], finish_reason="error", error=r.error, ttft_s=0.0, latency_s=0.0)


def _metrics(rows, wall_s):
    """Run metrics over every finished request in the file (earlier runs included)."""
    m = request_metrics(rows)
    return m | {"throughput_tok_s": m["generated_tokens"] / wall_s if wall_s > 0 else 0.0}
