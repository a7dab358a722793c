"""Progress lines in a batch log (stderr not a terminal)."""

import io

from mpinfer.engine.progress import Progress


def test_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress(total=10, already_done=2, every_s=0.0, stream=stream)
    progress.update(done=6, tokens=400)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert lines[0].startswith("mpinfer: 6/10 requests, 400 tokens,") and "tok/s" in lines[0] and "ETA" in lines[0]
    assert lines[1].startswith("mpinfer: 6/10 requests")
