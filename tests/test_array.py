"""A job split over a SLURM job array (slurm/array.sbatch: task I of N runs input.shard = "I/N")
and merged by a dependent job (slurm/merge.sbatch: `mpinfer merge`) equals a single run; the
merge refuses shard files that are missing, incomplete or of another job, and then writes
nothing; a shard is resumable on its own."""

import json
import os
import subprocess
import time

import h5py
import numpy as np
import pytest

from mpinfer.errors import UserError
from mpinfer.job import load_job
from test_run import BIN, mpinfer, prompt_lines, write_job
from test_slurm import ROOT, job_state, slurm, submit  # noqa: F401 (slurm: the module-scoped cluster fixture)

ARRAY = os.path.join(ROOT, "slurm", "array.sbatch")
MERGE = os.path.join(ROOT, "slurm", "merge.sbatch")
# Root attributes that may differ between the merged file and a single run's: how long and
# on which layout the runs took (the merged file keeps each task's in `shards`), and `job`,
# whose output.path differs here only because both files sit in one folder.
TIMED = {"wall_s", "startup_s", "throughput_tok_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s",
         "tpot_p90_s", "tpot_p99_s", "layout", "ranks.loaded", "job"}
TIMED_COLUMNS = {"ttft_s", "latency_s"}
# float32 log-probabilities: a request's batch mates change the order of the sums behind them
CLOSE_COLUMNS = {"logprobs", "top_logprobs"}


def write_array_job(folder, model, n):
    """A job of n mixed requests (greedy, seeded sampling, top-2 logprobs), a blank line at
    line 4 so that a row's index is not its position among the requests."""
    job, out = write_job(folder, model, prompt_lines(n))
    prompts = folder / "job.jsonl"
    lines = prompts.read_text().splitlines(keepends=True)
    prompts.write_text("".join(lines[:3] + ["\n"] + lines[3:]))
    return job, out


def test_array_then_merge_equals_one_run(slurm, tiny_model, tmp_path):
    job, out = write_array_job(tmp_path, tiny_model("llama"), 10)
    single = tmp_path / "single.h5"
    done = mpinfer(1, "run", job, "--set", f"output.path={single}")
    assert done.returncode == 0, done.stderr
    logs = str(tmp_path / "slurm-%A_%a.out")
    array_id = submit(slurm, tmp_path, "--array=0-2", "-n", "2", "-o", logs, ARRAY, job)
    merge_id = submit(slurm, tmp_path, f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes", "-o", logs,
                      MERGE, job, "--shards", "3")
    deadline = time.time() + 120
    while job_state(slurm, merge_id)[0] in ("PENDING", "RUNNING", "COMPLETING") and time.time() < deadline:
        time.sleep(0.2)
    text = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert job_state(slurm, merge_id) == ("COMPLETED", 0), text
    for i in range(3):  # each task ran its share of the lines, in its own complete file
        with h5py.File(tmp_path / f"job.shard-{i}-of-3.h5", "r") as f:
            assert f.attrs["complete"] and np.all(f["requests/index"][()] % 3 == i)
            assert f'shard = "{i}/3"' in f.attrs["job"]
    assert_merged_equals_single(out, single, shards=3)


def assert_merged_equals_single(merged, single, shards):
    with h5py.File(merged, "r") as m, h5py.File(single, "r") as s:
        assert list(m["requests/index"][()]) == [0, 1, 2, *range(4, len(s["requests/index"]) + 1)]
        assert set(m["requests"]) == set(s["requests"])
        for name in set(s["requests"]) - TIMED_COLUMNS:  # ids, output_ids, output_text, logprobs, ...
            a, b = m["requests"][name][()], s["requests"][name][()]
            close = name in CLOSE_COLUMNS
            assert len(a) == len(b) and all(np.allclose(x, y, rtol=1e-5, atol=1e-5) if close else np.array_equal(x, y)
                                            for x, y in zip(a, b)), name
        assert sum(len(x) for x in m["requests/top_logprobs"][()]) > 0  # some requests asked for them
        assert set(m.attrs) == set(s.attrs) | {"shards"}
        for name in set(s.attrs) - TIMED:  # fingerprint, model, complete, counts of requests and tokens
            assert m.attrs[name] == s.attrs[name], name
        assert m.attrs["job"] == s.attrs["job"].replace(str(single), str(merged))
        assert json.loads(m.attrs["layout"])["array_tasks"] == shards
        per_task = json.loads(m.attrs["shards"])
        assert len(per_task) == shards and m.attrs["wall_s"] == max(t["wall_s"] for t in per_task)
        assert m.attrs["throughput_tok_s"] == sum(t["throughput_tok_s"] for t in per_task)


@pytest.mark.parametrize("value", ["3/3", "1", "a/b", "-1/2"])
def test_bad_shard_key(tiny_model, tmp_path, value):
    job, _ = write_array_job(tmp_path, tiny_model("llama"), 2)
    with pytest.raises(UserError, match=r"^--set input.shard: expected"):
        load_job(job, [f"input.shard={value}"])


def test_shard_key(tiny_model, tmp_path):
    """A task's results file sits next to the job's output; its effective job names the shard
    and the job's output, and loads back to the same task."""
    job, _ = write_array_job(tmp_path, tiny_model("llama"), 2)
    task = load_job(job, ["input.shard=2/3"])
    assert task.output_path == str(tmp_path / "job.shard-2-of-3.h5")
    assert [i for i in range(9) if task.shard.takes(i)] == [2, 5, 8]
    job.write_text(task.toml())
    assert load_job(job) == task and f'path = "{tmp_path / "job.h5"}"' in task.toml()


def merge(job, *args):
    return subprocess.run([os.path.join(BIN, "mpinfer"), "merge", str(job), *args], capture_output=True, text=True,
                          timeout=60)


def assert_refused(done, *expected):
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert all(e in done.stderr for e in expected), done.stderr


def test_merge_refuses_shards_not_ready(tiny_model, tmp_path):
    job, out = write_array_job(tmp_path, tiny_model("llama"), 6)
    first, second = tmp_path / "job.shard-0-of-2.h5", tmp_path / "job.shard-1-of-2.h5"
    assert mpinfer(1, "run", job, "--set", "input.shard=0/2").returncode == 0
    assert_refused(merge(job, "--shards", "2"), "1 of 2 shard files not ready", f"{second}: missing")
    assert_refused(merge(job, "--shards", "3"), "3 of 3 shard files not ready", "job.shard-2-of-3.h5: missing")
    assert_refused(merge(job, "--shards", "2", "--set", "input.shard=1/2"), "leave input.shard unset")
    # task 1 of another job (other sampling) in the same place
    assert mpinfer(1, "run", job, "--set", "input.shard=1/2", "--set", "sampling.max_new_tokens=3").returncode == 0
    assert_refused(merge(job, "--shards", "2"), f"{second}: results of another job (sampling differ)")
    # the right task 1, stopped before its end (as by the time-limit signal)
    assert mpinfer(1, "run", job, "--set", "input.shard=1/2", "--overwrite").returncode == 0
    with h5py.File(second, "r+") as f:
        f.attrs["complete"] = False
    assert_refused(merge(job, "--shards", "2"), f"{second}: not complete (2 requests done; run task 1/2 again")
    assert not out.exists()
    # an output path holding something else is not replaced
    out.write_bytes(b"earlier results")
    done = mpinfer(1, "run", job, "--set", "input.shard=1/2")  # the shard resumes: nothing left, marked complete
    assert done.returncode == 0 and "2 requests" in done.stdout, done.stdout + done.stderr
    assert_refused(merge(job, "--shards", "2"), f"{out}: not an mpinfer results file; remove it")
    assert out.read_bytes() == b"earlier results"
    out.unlink()
    done = merge(job, "--shards", "2")
    assert done.returncode == 0 and "6 requests from 2 shard files" in done.stdout, done.stderr
    with h5py.File(out, "r") as f:
        assert list(f["requests/index"][()]) == [0, 1, 2, 4, 5, 6] and f.attrs["complete"]
        assert [x.decode() for x in f["requests/id"][()]] == [f"q{i}" for i in range(6)]
    assert not (tmp_path / "job.h5.lock").exists() and not (tmp_path / "job.h5.tmp").exists()
    assert first.exists() and second.exists()  # the shard files stay


def test_moe_counts_add_up(tiny_model, tmp_path):
    """The merged /moe counts of a MoE model are a single run's: per-expert loads summed over
    the tasks, imbalance recomputed."""
    job, out = write_array_job(tmp_path, tiny_model("mixtral"), 5)
    single = tmp_path / "single.h5"
    assert mpinfer(1, "run", job, "--set", f"output.path={single}").returncode == 0
    for i in range(2):
        assert mpinfer(1, "run", job, "--set", f"input.shard={i}/2").returncode == 0
    assert merge(job, "--shards", "2").returncode == 0
    with h5py.File(out, "r") as m, h5py.File(single, "r") as s:
        for name in s["moe"]:
            assert np.array_equal(m["moe"][name][()], s["moe"][name][()]), name
        for name in ("moe.imbalance_max", "moe.rank_imbalance_max", "moe.dropped"):
            assert m.attrs[name] == s.attrs[name], name
