"""Progress of the whole job, shown by rank 0 only: requests done / total, generated
tokens per second over all replicas, and the time left. On a terminal a tqdm bar; in a batch
log (stderr not a terminal) one plain line every `every_s` seconds."""

import sys
import time

from tqdm import tqdm


def _hms(seconds):
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, total, already_done, every_s=10.0, stream=sys.stderr):
        self.total, self.start_done = total, already_done
        self.every_s, self.stream = every_s, stream
        self.t0 = self.last = time.monotonic()
        self.done, self.tokens = already_done, 0
        self.bar = None
        if stream.isatty():
            self.bar = tqdm(total=total, initial=already_done, unit="req", file=stream, dynamic_ncols=True,
                            desc="mpinfer", smoothing=0.1)

    def update(self, done, tokens):
        """done: requests finished in all (earlier runs included); tokens: generated this run."""
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix_str(f"{tokens / max(now - self.t0, 1e-9):.0f} tok/s", refresh=False)
        elif now - self.last >= self.every_s:
            self.last = now
            print(self.line(done, tokens, now), file=self.stream, flush=True)
        self.done, self.tokens = done, tokens

    def line(self, done, tokens, now):
        elapsed = now - self.t0
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = _hms((self.total - done) / rate) if rate > 0 else "?"
        return (f"mpinfer: {done}/{self.total} requests, {tokens} tokens, {tokens / max(elapsed, 1e-9):.1f} tok/s, "
                f"elapsed {_hms(elapsed)}, ETA {eta}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            print(self.line(self.done, self.tokens, time.monotonic()), file=self.stream, flush=True)
