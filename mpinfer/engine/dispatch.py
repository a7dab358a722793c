"""Data parallel work sharing: one queue of requests on rank 0, replicas pull from it.

Rank 0 runs a service thread next to its own replica. It answers every replica's ask for
work within milliseconds, whatever rank 0's own replica is computing, so no replica waits
for another; it also receives finished requests and hands them on (to the results writer,
which runs on a thread of its own, so a slow flush never delays an answer). Replicas ask
before their queue runs dry, so a reply is there when they need it. Each grant is at most
1/(2R) of what is left (guided self-scheduling): large early, one request at the end, so
replicas finish together even when prompts differ wildly in length.

Messages are JSON (never pickle): ask {"n", "generated"} -> work {"requests": [...]}, an
empty list meaning the queue is drained; done {"records", "generated"}; bye {"generated",
"stopped"}; stop (rank 0 was told to stop: finish nothing more, say bye); final {"code"}.
While a replica waits, it polls with short sleeps instead of a blocking MPI call, because
MPICH's blocking calls spin and would steal a core from the ranks that compute. On rank 0
the service thread and the replica's collectives (TP, EP groups) call MPI at the same time,
on different communicators (MPI_THREAD_MULTIPLE, mpi4py's default).
"""

import collections
import dataclasses
import json
import threading
import time

import numpy as np
from mpi4py import MPI

from ..comm import Request, wait as wait_polling
from ..io.prompts import Request as PromptRequest
from ..params import SamplingParams

ASK, WORK, DONE, BYE, STOP, FINAL = range(1, 7)
POLL_S = 0.002


def send(comm, obj, dest, tag):
    comm.Send(json.dumps(obj).encode(), dest=dest, tag=tag)


def isend(comm, obj, dest, tag):
    """Non-blocking send of obj as JSON; a comm.Request (it keeps the buffer alive)."""
    buf = json.dumps(obj).encode()
    return Request(comm.Isend(buf, dest=dest, tag=tag), buf)


def poll(comm, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, block=False):
    """The next message as (source, tag, obj), or None when none is there and not block."""
    status = MPI.Status()
    while not comm.Iprobe(source, tag, status):
        if not block:
            return None
        time.sleep(POLL_S)
    buf = bytearray(status.Get_count(MPI.BYTE))
    comm.Recv(buf, status.Get_source(), status.Get_tag())
    return status.Get_source(), status.Get_tag(), json.loads(buf)


def wait(mpi_request):
    """Complete a non-blocking MPI request by polling (see the module docstring)."""
    wait_polling(mpi_request, POLL_S)


def allgather(comm, obj):
    """Every rank's obj (JSON-able), in rank order. Waits by polling (see wait())."""
    wait(comm.Ibarrier())
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.zeros(comm.size, np.int64)
    comm.Allgather(np.array([data.size], np.int64), sizes)
    out = np.empty(int(sizes.sum()), np.uint8)
    comm.Allgatherv(data, [out, sizes])
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [json.loads(out[a:b].tobytes()) for a, b in zip(bounds[:-1], bounds[1:])]


def bcast(comm, obj, root=0):
    """root's obj (JSON-able) on every rank of comm. Waits by polling (see wait())."""
    size = np.array([0], np.int64)
    if comm.rank == root:
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
        size[0] = data.size
    wait(comm.Ibcast(size, root=root))
    if comm.rank != root:
        data = np.empty(int(size[0]), np.uint8)
    wait(comm.Ibcast(data, root=root))
    return json.loads(data.tobytes())


def encode_request(r):
    return dict(index=r.index, id=r.id, prompt_ids=r.prompt_ids.tolist(), sampling=dataclasses.asdict(r.sampling))


def decode_request(d):
    return PromptRequest(d["index"], d["id"], np.asarray(d["prompt_ids"], np.int32), SamplingParams.from_json(d["sampling"]))


def plain(record):
    """A result record with JSON-able values."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in record.items()}


class Dispatcher:
    """Rank 0's queue, service thread and collection point.

    on_records(records) and tick() run on the service thread only. stop: a threading.Event
    set by a signal on rank 0; the dispatcher then grants nothing more and tells every
    replica to stop. leaders: the world rank that speaks for each replica (rank 0 first)."""

    def __init__(self, comm, pending, on_records, tick, stop, leaders):
        self.comm, self.on_records, self.tick, self.stop = comm, on_records, tick, stop
        self.pending = collections.deque(pending)
        self.leaders = leaders
        self.replicas = len(leaders)
        self.generated = [0] * comm.size  # tokens sampled per replica, for progress
        self.lock = threading.Lock()  # pending, inbox, generated[0], bye, stopped
        self.inbox = []  # rank 0's own finished records
        self.bye = 0
        self.stopped = False  # some replica stopped before the queue was drained
        self.sends = []  # messages in flight: a replica receives between its engine steps
        self.thread = threading.Thread(target=self._serve, name="mpinfer-dispatch", daemon=True)
        self.error = None

    def grant(self, n):
        with self.lock:
            if self.stop.is_set():
                return []
            k = min(n, max(1, -(-len(self.pending) // (2 * self.replicas))))
            return [self.pending.popleft() for _ in range(min(k, len(self.pending)))]

    def said_bye(self, stopped):
        with self.lock:
            self.bye += 1
            self.stopped |= stopped

    def _serve(self):
        try:
            told_to_stop = False
            while self.bye < self.replicas:
                if self.stop.is_set() and not told_to_stop:
                    self.sends += [isend(self.comm, {}, r, STOP) for r in self.leaders[1:]]
                    told_to_stop = True
                self._drain_inbox()
                self.tick()
                msg = poll(self.comm)
                if msg is None:
                    time.sleep(POLL_S)
                    continue
                source, tag, obj = msg
                self.generated[source] = obj.get("generated", self.generated[source])
                if tag == ASK:
                    reply = {"requests": [encode_request(r) for r in self.grant(obj["n"])]}
                    self.sends = [s for s in self.sends if not s.test()]
                    self.sends.append(isend(self.comm, reply, source, WORK))
                elif tag == DONE:
                    self.on_records(obj["records"])
                elif tag == BYE:
                    self.said_bye(obj["stopped"])
            self._drain_inbox()
            for request in self.sends:
                request.wait()
        except BaseException as e:  # the main thread sees it and aborts the job
            self.error = e

    def _drain_inbox(self):
        with self.lock:
            records, self.inbox = self.inbox, []
        if records:
            self.on_records(records)


class LocalQueue:
    """Rank 0's replica talks to the dispatcher directly (no MPI from the main thread)."""

    def __init__(self, dispatcher):
        self.d = dispatcher
        self.drained = False

    def check(self, stop):
        if self.d.error is not None:  # the service thread died: end the job
            raise RuntimeError("the dispatch thread failed") from self.d.error

    def take(self, n, block=False):
        got = self.d.grant(n)
        self.drained = not got
        return got

    def put(self, records, generated):
        with self.d.lock:
            self.d.inbox.extend(plain(r) for r in records)
            self.d.generated[0] = generated

    def close(self, generated, stopped):
        with self.d.lock:
            self.d.generated[0] = generated
        self.d.said_bye(stopped)


class ListQueue:
    """A fixed list of requests in place of rank 0's queue (experts.py's routing pass); what
    finishes is dropped."""

    def __init__(self, requests):
        self.requests = list(requests)
        self.drained = not self.requests

    def check(self, stop):
        pass

    def take(self, n, block=False):
        got, self.requests = self.requests[:n], self.requests[n:]
        self.drained = not self.requests
        return got

    def put(self, records, generated):
        pass

    def close(self, generated, stopped):
        pass


class RemoteQueue:
    """Another replica's view of rank 0's queue: one ask in flight at a time."""

    def __init__(self, comm):
        self.comm = comm
        self.asked = False
        self.drained = False
        self.generated = 0

    def check(self, stop):
        """Sets stop when rank 0 says so."""
        if self.comm.Iprobe(0, STOP):
            poll(self.comm, 0, STOP)
            stop.set()

    def take(self, n, block=False):
        """Requests granted to us, if the answer to our ask is there (or, with block, once it
        is); asks again for n otherwise. [] also when the queue is drained."""
        if not self.asked:
            send(self.comm, {"n": n, "generated": self.generated}, 0, ASK)
            self.asked = True
        msg = poll(self.comm, 0, WORK, block)
        if msg is None:
            return []
        self.asked = False
        requests = msg[2]["requests"]
        self.drained = not requests
        return [decode_request(d) for d in requests]

    def put(self, records, generated):
        self.generated = generated
        send(self.comm, {"records": [plain(r) for r in records], "generated": generated}, 0, DONE)

    def close(self, generated, stopped):
        if self.asked:  # rank 0 answers every ask; its answer must not be left unreceived
            poll(self.comm, 0, WORK, block=True)
        send(self.comm, {"generated": generated, "stopped": stopped}, 0, BYE)
