"""Continuous batching on one replica.

Every engine step runs one forward pass over at most `max_batch_tokens` new tokens: first
one token for each running request that is decoding, then prefill chunks of running
requests that are still reading their prompt, then the prompts of newly admitted requests,
cut to fit the budget (chunked prefill). A request is admitted only while it fits
`max_seqs` and the free KV blocks; when decoding runs out of blocks, the newest running
request is preempted: its blocks are freed and it goes back to the front of the queue with
its generated tokens, to be recomputed. Finished requests free their blocks at once.

A request's tokens depend only on its prompt, its sampling parameters and its id (the
random stream is keyed by them), never on which requests share its steps.
"""

import collections
import time

import numpy as np

from . import sampling
from .logits import VocabShards, choose


class Sequence:
    """A request in flight: its tokens so far (prompt, then generated) and its results."""

    def __init__(self, request, cache, now):
        self.request, self.cache = request, cache
        self.params = request.sampling
        self.key = sampling.request_key(request.id)
        self.tokens = [int(t) for t in request.prompt_ids]
        self.output, self.logprobs, self.top_ids, self.top_logprobs = [], [], [], []
        self.text, self.finish_reason = "", None
        self.cut = False  # text was cut before a stop string
        self.t_arrival, self.t_first = now, None

    @property
    def todo(self):
        """Tokens not yet in the KV cache (the whole prompt at first, then 1 per step)."""
        return len(self.tokens) - self.cache.length


class Plan:
    """One step of a scheduler: scheduled [(sequence, new tokens)], the new token ids
    concatenated, the cache geometry (batch), and the sequences whose input this step
    completes (done; their last new token is at last_tokens of the step): they get a token."""

    def __init__(self, scheduled, batch):
        self.scheduled, self.batch = scheduled, batch
        self.ids = np.concatenate([np.zeros(0, np.int64)] + [seq.tokens[seq.cache.length : seq.cache.length + n] for seq, n in scheduled])
        rows = [i for i, (seq, n) in enumerate(scheduled) if seq.cache.length + n == len(seq.tokens)]
        self.done = [scheduled[i][0] for i in rows]
        self.last_tokens = (np.cumsum(batch.counts) - 1)[rows]  # their last new token in the step

    def local_ids(self):
        """The step's token ids this rank computes: all of them, or its share of a long
        prompt under context parallelism."""
        return self.ids if self.batch.take is None else self.ids[self.batch.take]

    def wants(self):
        """(params, request key, step) of each done sequence, for logits.choose()."""
        return [(seq.params, seq.key, len(seq.output)) for seq in self.done]


class Scheduler:
    """long_prompt: under context parallelism, prompts of at least this many tokens have
    their cache sharded over the CP group and their whole prefill in a step of their own
    (its tokens split over the group, however many); 0 = no context parallelism."""

    def __init__(self, model, tokenizer, pool, max_batch_tokens, max_seqs, long_prompt=0):
        self.model, self.tokenizer, self.pool = model, tokenizer, pool
        self.max_batch_tokens, self.max_seqs, self.long_prompt = max_batch_tokens, max_seqs, long_prompt
        self.context = model.config.max_position
        self.eos = frozenset(model.config.eos_token_ids)
        self.waiting = collections.deque()  # Sequence, oldest first
        self.running = []  # Sequence, in admission order
        self.generated = 0  # tokens sampled so far (progress and throughput)

    def add(self, requests):
        now = time.perf_counter()
        for r in requests:
            seq = Sequence(r, self.pool.sequence(), now)
            seq.cache.sharded = 0 < self.long_prompt <= len(seq.tokens)
            self.waiting.append(seq)

    @property
    def idle(self):
        return not self.waiting and not self.running

    def step(self):
        """Run one forward pass; return the records of the requests it finished."""
        plan = self.plan()
        if plan is None:
            return []
        model = self.model
        logits = model.step(plan.ids, plan.batch, plan.last_tokens)  # (R, V/P): only the sequences that get a token
        if not plan.done:
            return []
        return self.complete(plan, choose(VocabShards(logits, model.vocab_offset, model.tp.group), plan.wants()))

    def plan(self):
        """The next step's work (the KV blocks it needs reserved), or None when there is none."""
        scheduled = self._schedule()
        if not scheduled:
            if self.waiting and len(self.pool.free) == self.pool.num_blocks:  # alone, and still no room
                seq = self.waiting[0]
                raise MemoryError(f"request {seq.request.id!r}: {len(seq.tokens)} tokens do not fit the KV cache "
                                  f"({self.pool.num_blocks} blocks of {self.pool.block_size}); raise engine.kv_cache_gb")
            return None
        return Plan(scheduled, self.pool.batch([seq.cache for seq, _ in scheduled], [n for _, n in scheduled]))

    def empty_plan(self):
        """A step with no tokens: an idle replica's part in a step of its expert-parallel group."""
        return Plan([], self.pool.batch([], []))

    def complete(self, plan, chosen):
        """Take the tokens chosen for plan.done (logits.choose()) and apply the stop rules;
        return the records of the requests that finished. (The forward pass of the plan
        has committed its K/V.)"""
        now = time.perf_counter()
        finished = []
        for i, seq in enumerate(plan.done):
            p, token = seq.params, int(chosen["tokens"][i])
            seq.tokens.append(token)
            seq.output.append(token)
            seq.logprobs.append(float(chosen["logprobs"][i]))
            seq.top_ids.extend(chosen["top_ids"][i])
            seq.top_logprobs.extend(chosen["top_logprobs"][i])
            self.generated += 1
            if seq.t_first is None:
                seq.t_first = now
            if token in self.eos or token in p.stop_token_ids:
                seq.finish_reason = "stop"
            elif p.stop and self._cut_at_stop(seq):
                seq.finish_reason, seq.cut = "stop", True
            elif len(seq.output) >= p.max_new_tokens or len(seq.tokens) >= self.context:
                seq.finish_reason = "length"
            if seq.finish_reason:
                self.running.remove(seq)
                self.pool.release(seq.cache)
                finished.append(self._record(seq, now))
        return finished

    def _schedule(self):
        """[(sequence, new tokens)] for this step within the token budget and the KV pool."""
        if self.waiting and self.waiting[0].cache.sharded and len(self.running) < self.max_seqs:
            seq = self.waiting[0]  # a long prompt: its whole prefill over the CP group, alone
            if self.pool.blocks_needed(seq.cache, len(seq.tokens) + 1) <= len(self.pool.free):
                self.running.append(self.waiting.popleft())
                return [(seq, seq.todo)]
        budget, scheduled = self.max_batch_tokens, []
        for seq in list(self.running):  # decodes first (todo == 1), then unfinished prefills
            if budget == 0:
                break
            if seq not in self.running:  # preempted below to make room for an older one
                continue
            n = min(seq.todo, budget)
            while not self.pool.reserve(seq.cache, seq.cache.length + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            if seq.cache.sharded:  # waits for a step of its own (above)
                break
            n = min(seq.todo, budget)
            # admit only when the whole prompt fits the free blocks, not just this chunk
            if self.pool.blocks_needed(seq.cache, len(seq.tokens) + 1) > len(self.pool.free):
                break
            self.pool.reserve(seq.cache, seq.cache.length + n)
            self.running.append(self.waiting.popleft())
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def _preempt(self, seq):
        self.running.remove(seq)
        self.pool.release(seq.cache)  # recomputed from its tokens when readmitted
        self.waiting.appendleft(seq)

    def _cut_at_stop(self, seq):
        """True when a stop string appeared; seq.text is then cut before its first one. A stop
        string may span several tokens, so the text is decoded whole each step."""
        text = self.tokenizer.decode(seq.output)
        # only the part that can hold a new occurrence (a few characters of slack for bytes
        # that completed a character only now)
        start = max(0, len(seq.text) - max(map(len, seq.params.stop)) - 4)
        hits = [i for i in (text.find(s, start) for s in seq.params.stop) if i >= 0]
        seq.text = text[: min(hits)] if hits else text
        return bool(hits)

    def _record(self, seq, now):
        if not seq.cut:
            seq.text = self.tokenizer.decode(seq.output)
        r = seq.request
        return dict(id=r.id, index=r.index, prompt_ids=np.asarray(r.prompt_ids, np.int32), output_ids=seq.output,
                    output_text=seq.text, logprobs=seq.logprobs, top_logprob_ids=seq.top_ids,
                    top_logprobs=seq.top_logprobs, finish_reason=seq.finish_reason, error="",
                    ttft_s=seq.t_first - seq.t_arrival, latency_s=now - seq.t_arrival)
