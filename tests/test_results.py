"""The results file: resume, fingerprint checks, finish, summary, and survival of kill -9."""

import os
import random
import select
import signal
import time
import traceback

import h5py
import numpy as np
import pytest

from mpinfer.errors import UserError
from mpinfer.io.results import COLUMNS, ResultsFile, lock, read_rows, summary

FP = {"model": "m-sha256", "prompts": "p-sha256", "sampling": {"temperature": 0.0, "max_new_tokens": 8}}
ATTRS = {"mpinfer_version": "0.1.0", "job": "[model]\npath = 'm.gguf'\n",
         "layout": '{"world": 2, "dp": 2, "tp": 1}', "model": '{"hidden_size": 96}'}


def record(i, top_n=0):
    """A finished request whose every field is a function of its index i (T = i % 5 tokens)."""
    t = i % 5
    return {"id": f"q{i}", "index": i, "prompt_ids": np.arange(i % 3 + 1, dtype=np.int32),
            "output_ids": [i + k for k in range(t)], "output_text": f"text {i} é",
            "logprobs": [-0.5 * k for k in range(t)],
            "top_logprob_ids": np.arange(t * top_n).reshape(t, top_n), "top_logprobs": [-1.0] * (t * top_n),
            "finish_reason": ["stop", "length", "error"][i % 3], "error": "bad line" if i % 3 == 2 else "",
            "ttft_s": 0.01 * i, "latency_s": 0.1 * i}


def assert_rows(path, indices, top_n=0):
    """The file holds exactly the records of `indices`, in that order, field for field."""
    rows = read_rows(path)
    assert rows.keys() == COLUMNS.keys()
    assert all(len(v) == len(indices) for v in rows.values())
    for j, i in enumerate(indices):
        for name, value in record(i, top_n).items():  # exact: every float is exact in float32
            got = rows[name][j]
            assert got == value if isinstance(value, str) else np.array_equal(np.ravel(got), np.ravel(value)), (name, i)


def test_flush_then_resume(tmp_path):
    path = tmp_path / "r.h5"
    out = ResultsFile(path, FP, ATTRS)
    assert (out.done, out.complete, out.rows_written, out.wall_s_before) == (set(), False, 0, 0.0)
    out.add([record(i, top_n=2) for i in (3, 0, 4)])
    assert not path.exists()  # buffered until the flush
    out.flush(wall_s=5.0)
    assert out.rows_written == 3 and out.last_flush_s > 0
    assert_rows(path, [3, 0, 4], top_n=2)

    again = ResultsFile(path, FP, ATTRS)
    assert again.done == {0, 3, 4} and again.rows_written == 3 and again.wall_s_before == 5.0
    assert not again.complete
    again.add([record(1, top_n=2)])
    again.flush(wall_s=2.0)
    assert_rows(path, [3, 0, 4, 1], top_n=2)
    with h5py.File(path) as f:
        assert f.attrs["wall_s"] == 7.0 and not f.attrs["complete"]
        assert f.attrs["job"] == ATTRS["job"]
        ds = f["requests/top_logprob_ids"]
        assert ds.maxshape == (None,) and "N = len / len(output_ids)" in ds.attrs["description"]


def test_first_flush_creates_the_file_and_empty_flushes_leave_it_alone(tmp_path):
    path = tmp_path / "r.h5"
    out = ResultsFile(path, FP, ATTRS)
    out.flush(wall_s=1.0)
    assert_rows(path, [])
    before = os.stat(path)
    out.flush(wall_s=2.0)
    assert os.stat(path).st_ino == before.st_ino  # not rewritten
    assert ResultsFile(path, FP, ATTRS).wall_s_before == 1.0


def test_different_job_is_refused(tmp_path):
    path = tmp_path / "r.h5"
    out = ResultsFile(path, FP, ATTRS)
    out.add([record(0)])
    out.flush(wall_s=1.0)
    with pytest.raises(UserError) as error:
        ResultsFile(path, {**FP, "model": "other", "extra": 1}, ATTRS)
    message = str(error.value)
    assert f"{path} holds results of a different job (extra, model differ)" in message
    assert "prompts" not in message and "--overwrite" in message and "\n" not in message


def test_not_a_results_file(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    for path in (text, tmp_path / "other.h5"):
        with pytest.raises(UserError, match=f"^{path}: not an mpinfer results file \\(use --overwrite"):
            ResultsFile(path, FP, ATTRS)
        with pytest.raises(UserError, match="not an mpinfer results file"):
            summary(path)
    with pytest.raises(UserError, match="no such file"):
        summary(tmp_path / "missing.h5")


def test_overwrite_replaces_at_first_flush(tmp_path):
    path = tmp_path / "r.h5"
    path.write_text("not hdf5")
    out = ResultsFile(path, {"model": "new"}, ATTRS, overwrite=True)
    assert out.done == set() and out.rows_written == 0
    assert path.read_text() == "not hdf5"  # not deleted up front
    out.add([record(7)])
    out.flush(wall_s=1.0)
    assert_rows(path, [7])
    assert ResultsFile(path, {"model": "new"}, ATTRS).done == {7}


def test_duplicate_index_is_an_error(tmp_path):
    path = tmp_path / "r.h5"
    out = ResultsFile(path, FP, ATTRS)
    out.add([record(0)])
    with pytest.raises(ValueError, match="index 0"):
        out.add([record(0)])  # still buffered
    out.flush(wall_s=1.0)
    with pytest.raises(ValueError, match="index 0"):
        out.add([record(0)])  # flushed
    with pytest.raises(ValueError, match="index 0"):
        ResultsFile(path, FP, ATTRS).add([record(1), record(0)])  # finished by an earlier run
    with pytest.raises(ValueError, match="keys"):
        out.add([{**record(2), "extra": 1}])


def test_stale_tmp_is_removed(tmp_path):
    path = tmp_path / "r.h5"
    tmp = tmp_path / "r.h5.tmp"
    tmp.write_bytes(b"half a file")
    ResultsFile(path, FP, ATTRS)
    assert not tmp.exists()


def finished(path, order, flush_every):
    """A finished file written with records added in `order`, flushing every `flush_every` rows."""
    out = ResultsFile(path, FP, ATTRS)
    for k, i in enumerate(order):
        out.add([record(i, top_n=3)])
        if k % flush_every == flush_every - 1:
            out.flush(wall_s=1.0)
    out.finish(wall_s=9.0, metrics={"tokens_per_s": 123.5, "ttft_p50_s": 0.25, "requests": len(order)})
    return out


def test_finish_sorts_by_index_and_is_deterministic(tmp_path):
    order = list(range(50))
    random.Random(0).shuffle(order)
    a = finished(tmp_path / "a.h5", order, flush_every=7)
    finished(tmp_path / "b.h5", sorted(order, reverse=True), flush_every=50)
    assert a.complete and a.rows_written == 50
    assert_rows(tmp_path / "a.h5", range(50), top_n=3)
    # The same rows give the same file, whatever order they came in and however often flushed.
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    with h5py.File(tmp_path / "a.h5") as f:
        assert f.attrs["complete"] and f.attrs["tokens_per_s"] == 123.5 and f.attrs["wall_s"] == 9.0

    again = ResultsFile(tmp_path / "a.h5", FP, ATTRS)
    assert again.complete and again.done == set(range(50)) and again.wall_s_before == 9.0
    with pytest.raises(ValueError, match="wall_s"):
        again.finish(wall_s=0.0, metrics={"wall_s": 1.0})


def test_summary(tmp_path):
    path = tmp_path / "r.h5"
    finished(path, range(7), flush_every=3)
    s = summary(path)
    assert s == {
        "path": str(path), "complete": True, "rows": 7,
        "finish_reasons": {"error": 2, "length": 2, "stop": 3},
        "prompt_tokens": sum(i % 3 + 1 for i in range(7)), "generated_tokens": sum(i % 5 for i in range(7)),
        "wall_s": 9.0, "mpinfer_version": "0.1.0",
        "metrics": {"requests": 7, "tokens_per_s": 123.5, "ttft_p50_s": 0.25},
        "layout": {"world": 2, "dp": 2, "tp": 1}, "model": {"hidden_size": 96},
    }


BATCH = 40  # rows per flush in the crash test


def writer(path, pipe):
    """Child process: resume the file, then add and flush BATCH rows at a time forever,
    reporting each completed flush's row count on the pipe."""
    out = ResultsFile(path, FP, ATTRS)
    i = out.rows_written
    while True:
        out.add([record(j) for j in range(i, i + BATCH)])
        out.flush(wall_s=0.0)
        i += BATCH
        os.write(pipe, f"{i}\n".encode())


def test_survives_kill_at_any_moment(tmp_path):
    path = str(tmp_path / "r.h5")
    rng = random.Random(1)
    rows, mid_flush = 0, 0
    for _ in range(20):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                writer(path, write_end)
            except BaseException:
                traceback.print_exc()  # shows in pytest's captured stderr
            finally:
                os._exit(1)
        os.close(write_end)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        reported = [rows]
        while select.select([read_end], [], [], 0)[0]:
            data = os.read(read_end, 1 << 16)
            if not data:
                break
            reported += [int(n) for n in data.split()]
        os.close(read_end)
        mid_flush += os.path.exists(path + ".tmp")
        if not os.path.exists(path):  # killed before its first flush
            assert reported == [0]
            continue
        with h5py.File(path) as f:
            assert len({len(ds) for ds in f["requests"].values()}) == 1, "datasets of unequal length"
            rows = len(f["requests/index"])
        # Every flush the child reported, and perhaps one more it had no time to report.
        assert rows in (reported[-1], reported[-1] + BATCH)
        assert_rows(path, range(rows))
    assert rows > 10 * BATCH
    assert mid_flush >= 3, "too few kills landed inside a flush to test anything"


def test_one_run_per_file(tmp_path):
    path = str(tmp_path / "r.h5")
    held = lock(path)
    with pytest.raises(UserError, match="being written by another mpinfer run"):
        lock(path)
    os.close(held)
    os.close(lock(path))


def test_unwritable_folder_is_refused_up_front():
    with pytest.raises(UserError, match="^/proc/r.h5: cannot write the results file here"):
        ResultsFile("/proc/r.h5", FP, ATTRS)  # not even root may create files in /proc


def test_arrays_outside_requests_survive_resume(tmp_path):
    path = tmp_path / "r.h5"
    first = ResultsFile(path, {"job": 1}, {})
    first.set_arrays({"moe/layers": (np.array([0, 2]), "ids"), "moe/expert_load": (np.ones((2, 4), np.int64), "load")})
    first.flush(1.0)
    again = ResultsFile(path, {"job": 1}, {})
    assert sorted(again.arrays) == ["moe/expert_load", "moe/layers"]
    assert again.arrays["moe/expert_load"][0].tolist() == [[1] * 4] * 2 and again.arrays["moe/layers"][1] == "ids"
    again.finish(1.0, {})
    with h5py.File(path, "r") as f:  # kept by finish() although this run set none
        assert f["moe/layers"][()].tolist() == [0, 2] and f["moe/expert_load"].attrs["description"] == "load"
