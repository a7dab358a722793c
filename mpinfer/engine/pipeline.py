"""A replica at work: its first pipeline stage schedules and samples' results come back to
it; the other stages run their layers on what arrives.

A replica is pp stages of tp ranks. Each stage's TP group runs in lockstep (same inputs,
same collectives). The first stage holds M schedulers, one per micro-batch, each with its
own requests; it plans a step of every idle micro-batch, runs its layers and sends the
hidden states (T, D) with the step's cache geometry to the next stage; the last stage
computes the logits, chooses the tokens and sends them back to the first stage, which
completes that micro-batch and plans its next step. With M >= pp micro-batches in flight
every stage has work in steady state; with M = 1 a stage idles (pp-1)/pp of the time (the
pipeline bubble). With pp = 1 the same loop runs one micro-batch through a LocalPipe.

Point-to-point messages go along the pipeline group (same tp rank in every stage): a JSON
header (tag HEADER), the activations (tag ACT, counted by comm.Group), the chosen tokens
from the last stage to the first (tag RESULT), and {"end": true} when the first stage is done.
"""

import collections
import dataclasses
import time

import numpy as np

from ..kvcache import Batch
from ..params import SamplingParams
from . import dispatch
from .logits import VocabShards, choose

HEADER, ACT, RESULT = 21, 22, 23
NOTHING = {"tokens": [], "logprobs": [], "top_ids": [], "top_logprobs": []}  # a step that finished no prompt


def _choose(model, logits, wants):
    """logits() -> the logits (R, V/P) of the tokens that get a token, one for each of wants."""
    if not wants:  # the same on every TP and CP rank: no collective is skipped by one rank alone
        return dict(NOTHING)
    return choose(VocabShards(logits(), model.vocab_offset, model.tp.group), wants)


class LocalPipe:
    """pp = 1: the whole model here; a launched step is finished at once."""

    def __init__(self, model):
        self.model, self.result = model, None

    def launch(self, k, plan):
        logits = self.model.step(plan.local_ids(), plan.batch, plan.last_tokens)  # (R, V/P), or None when R = 0
        self.result = _choose(self.model, lambda: logits, plan.wants())

    def land(self, k, plan):
        return self.result

    def close(self):
        pass


class _Outbox:
    """Messages in flight along the pipeline group: a JSON header, then the activations."""

    def __init__(self, pp):
        self.pp, self.sends = pp, []

    def send(self, dest, tag, header, x=None):
        self.sends = [r for r in self.sends if not r.test()]
        self.sends.append(dispatch.isend(self.pp.comm, header, dest, tag))
        if x is not None:
            self.sends.append(self.pp.send(x, dest, ACT))

    def drain(self):
        for request in self.sends:
            request.wait()


class Pipe:
    """The first stage's end of the pipeline. stage_busy_s: seconds each stage computed."""

    def __init__(self, model, pp):
        self.model, self.pp = model, pp
        self.outbox = _Outbox(pp)
        self.stage_busy_s = [0.0] * pp.size

    def launch(self, k, plan):
        t = time.perf_counter()
        x = self.model.run_layers(self.model.embed_tokens(plan.local_ids()), plan.batch)  # (T, D)
        plan.batch.commit()
        header = {"mb": k, **plan.batch.geometry(), "last_tokens": plan.last_tokens.tolist(),
                  "wants": [[dataclasses.asdict(p), key, step] for p, key, step in plan.wants()],
                  "busy": [time.perf_counter() - t]}
        self.outbox.send(1, HEADER, header, self.model.be.to_numpy(x))  # MPI carries host arrays

    def land(self, k, plan):
        chosen = dispatch.poll(self.pp.comm, self.pp.size - 1, RESULT, block=True)[2]
        for stage, seconds in enumerate(chosen.pop("busy")):
            self.stage_busy_s[stage] += seconds
        return chosen

    def close(self):
        self.outbox.send(1, HEADER, {"end": True})
        self.outbox.drain()


def run_stage(model, pool, pp):
    """A stage after the first: run this stage's layers on every step that arrives, until
    the first stage says it is done."""
    last = pp.rank == pp.size - 1
    outbox = _Outbox(pp)
    while True:
        header = dispatch.poll(pp.comm, pp.rank - 1, HEADER, block=True)[2]
        if header.get("end"):
            if not last:
                outbox.send(pp.rank + 1, HEADER, header)
            break
        T = sum(header["q_lens"])  # my rows of them under sequence parallelism
        rows = model.tp.rows(T)[model.tp.rank] if model.tp.sp else T
        request, x = pp.recv((rows, model.config.hidden_size), np.float32, pp.rank - 1, ACT)
        request.wait()
        t = time.perf_counter()
        batch = Batch.of_geometry(pool, header)
        x = model.run_layers(model.be.asarray(x), batch)
        if last:
            wants = [(SamplingParams.from_json(p), key, step) for p, key, step in header["wants"]]
            rows = np.array(header["last_tokens"], np.int64)
            chosen = _choose(model, lambda: model.logits(model.final_rows(x, batch, rows)), wants)
            chosen["busy"] = header["busy"] + [time.perf_counter() - t]
            outbox.send(0, RESULT, chosen)
        else:
            header["busy"].append(time.perf_counter() - t)
            outbox.send(pp.rank + 1, HEADER, header, model.be.to_numpy(x))
    outbox.drain()


class Replica:
    """The first stage of one data-parallel replica (all of it when pp = 1). The TP group's
    first rank (the leader; with context parallelism, the first of its CP group's) talks to
    rank 0's queue and broadcasts, before each round, the requests it got and whether to
    stop; every rank of the groups then makes the same scheduling decisions and takes part
    in the same collectives.

    lockstep: the comm.Group of an expert-parallel group spanning replicas, or None. Its
    replicas' MoE layers exchange tokens, so they run every step together: each round they
    agree (a logical or over the group) which micro-batches launch a step, a replica without
    work for one launching an empty step, and they leave the loop together when none of them
    has anything left. Every stage then sees the same sequence of steps on every replica."""

    def __init__(self, schedulers, pipe, tp, stop, lockstep=None, cp=None):
        self.schedulers, self.pipe, self.tp, self.stop, self.lockstep = schedulers, pipe, tp, stop, lockstep
        self.cp = cp if cp is not None and cp.size > 1 else None  # CP ranks schedule alike too
        self.run_s = 0.0

    @property
    def generated(self):
        return sum(s.generated for s in self.schedulers)

    def run(self, queue):
        """queue: the dispatch queue on the leader, None on the other ranks of the group.
        Runs until the queue is drained and everything taken is finished, or until told to
        stop (the unfinished requests are left for the next run)."""
        t0 = time.perf_counter()
        scheds = self.schedulers
        low_water = max(4, sum(s.max_seqs for s in scheds) // 8)
        inflight = collections.deque()  # (micro-batch, plan), oldest first
        while True:
            order = self._order(queue, idle=not inflight and all(s.idle for s in scheds), low_water=low_water)
            for r in order["requests"]:  # to the least loaded micro-batch
                min(scheds, key=lambda s: len(s.running) + len(s.waiting)).add([r])
            busy = {k for k, _ in inflight}
            plans = [None if order["stop"] or k in busy else sched.plan() for k, sched in enumerate(scheds)]
            finished = not inflight and (order["stop"] or (order["drained"] and all(s.idle for s in scheds)))
            launch = [p is not None for p in plans]
            if self.lockstep is not None:
                *launch, active = self.lockstep.any(launch + [not finished])
                finished = not active
            for k, go in enumerate(launch):
                if go:
                    plan = plans[k] or scheds[k].empty_plan()
                    self.pipe.launch(k, plan)
                    inflight.append((k, plan))
            if not inflight:
                if finished:
                    break
                continue
            k, plan = inflight.popleft()
            finished = scheds[k].complete(plan, self.pipe.land(k, plan))
            if finished and queue is not None:
                queue.put(finished, self.generated)
        self.pipe.close()
        self.run_s = time.perf_counter() - t0
        if queue is not None:
            queue.close(self.generated, order["stop"])

    def _order(self, queue, idle, low_water):
        """The leader's order for this round, on every rank of the TP group."""
        if queue is not None:
            queue.check(self.stop)
            scheds = self.schedulers
            waiting = sum(len(s.waiting) for s in scheds)
            room = sum(s.max_seqs - len(s.running) - len(s.waiting) for s in scheds)
            new = []
            if not self.stop.is_set() and not queue.drained and waiting < low_water and room > 0:
                new = queue.take(room, block=idle)
            order = {"stop": self.stop.is_set(), "drained": queue.drained, "requests": new}
        else:
            order = None
        if self.tp.size == 1 and self.cp is None:
            return order
        if order is not None:
            order = {**order, "requests": [dispatch.encode_request(r) for r in order["requests"]]}
        if self.cp is not None and self.tp.rank == 0:  # the leader's CP group, then each one's TP group
            order = dispatch.bcast(self.cp.comm, order)
        if self.tp.size > 1:
            order = dispatch.bcast(self.tp.comm, order)
        return {**order, "requests": [dispatch.decode_request(d) for d in order["requests"]]}
