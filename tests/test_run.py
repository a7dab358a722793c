"""`mpinfer run` end to end under real `mpiexec`: data parallel replicas, invariance of every
request's tokens to the number of ranks, kill -9 and resume, validation before compute."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from mpinfer.io.results import read_rows

BIN = os.path.dirname(sys.executable)
WORDS = "the quick brown fox jumps over the lazy dog hello world there".split()


def prompt_lines(n, seed=0):
    """n requests of very different lengths in all three forms, some with their own sampling."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, rng.integers(1, 60)))
        kind = i % 3
        line = {"id": f"q{i}"}
        if kind == 0:
            line["prompt"] = text
        elif kind == 1:
            line["messages"] = [{"role": "user", "content": text}]
        else:
            line["input_ids"] = [int(t) for t in rng.integers(3, 300, rng.integers(1, 40))]
        if i % 4 == 1:
            line["sampling"] = {"temperature": 0.9, "top_p": 0.95, "seed": 11}
        if i % 5 == 2:
            line["sampling"] = {"max_new_tokens": 3, "logprobs": 2}
        lines.append(line)
    return lines


def write_job(folder, model, lines, name="job", **sections):
    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / f"{name}.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = {"model": {"path": model}, "input": {"path": str(prompts)}, "output": {"path": str(folder / f"{name}.h5")},
           "sampling": {"max_new_tokens": 10}, "engine": {"max_batch_tokens": 64, "flush_seconds": 0.2}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in kv.items()) for s, kv in cfg.items())
    job = folder / f"{name}.toml"
    job.write_text(text)
    return job, folder / f"{name}.h5"


def mpinfer(n, *args, timeout=300, env=None):
    cmd = [os.path.join(BIN, "mpiexec"), "-n", str(n), os.path.join(BIN, "mpinfer"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def rows_by_id(path):
    rows = read_rows(path)
    return {rows["id"][i]: (list(rows["output_ids"][i]), rows["output_text"][i], rows["finish_reason"][i])
            for i in range(len(rows["id"]))}


def assert_complete(path, n):
    with h5py.File(path, "r") as f:
        assert bool(f.attrs["complete"])
        index = f["requests/index"][:]
        ids = [x.decode() for x in f["requests/id"][:]]
    assert list(index) == list(range(n))  # sorted by index, each exactly once
    assert len(set(ids)) == n


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """An uninterrupted one-rank run of 24 mixed requests."""
    job, out = write_job(tmp_path_factory.mktemp("ref"), model, prompt_lines(24))
    done = mpinfer(1, "run", job)
    assert done.returncode == 0, done.stderr
    assert_complete(out, 24)
    return rows_by_id(out)


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_do_not_change_tokens(model, reference, tmp_path, ranks):
    job, out = write_job(tmp_path, model, prompt_lines(24))
    done = mpinfer(ranks, "run", job)
    assert done.returncode == 0, done.stderr
    assert_complete(out, 24)
    assert rows_by_id(out) == reference


def test_alone_equals_in_batch(model, reference, tmp_path):
    lines = prompt_lines(24)
    for i in (1, 5, 9):  # a seeded sampled request, a greedy one, a short one
        job, out = write_job(tmp_path / str(i), model, [lines[i]])
        done = mpinfer(1, "run", job)
        assert done.returncode == 0, done.stderr
        assert rows_by_id(out)[f"q{i}"] == reference[f"q{i}"]


@pytest.mark.parametrize("n", [0, 3, 50])
def test_four_replicas(model, tmp_path, n):
    job, out = write_job(tmp_path, model, prompt_lines(n, seed=n))
    done = mpinfer(4, "run", job)
    assert done.returncode == 0, done.stderr
    assert_complete(out, n)
    summary = json.loads(mpinfer(1, "inspect", out, "--json").stdout)
    assert summary["rows"] == n and summary["complete"] is True


def rank_pids(job):
    """{MPI rank: pid} of the processes of `mpinfer run job` (not mpiexec), from /proc."""
    ranks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = dict(v.split(b"=", 1) for v in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if b"run" in args and str(job).encode() in args and b"PMI_RANK" in env:
            ranks[int(env[b"PMI_RANK"])] = int(pid)
    return ranks


def start_and_wait_for_rows(job, out, ranks=2, rows=2, sets=()):
    """Start `mpinfer run job` on `ranks` ranks; return once the results file holds `rows`."""
    cmd = [os.path.join(BIN, "mpiexec"), "-n", str(ranks), os.path.join(BIN, "mpinfer"), "run", str(job)]
    cmd += [x for s in sets for x in ("--set", s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists():
            try:
                if len(read_rows(out)["id"]) >= rows:
                    break
            except OSError:  # being replaced right now
                pass
        time.sleep(0.02)
    pids = rank_pids(job)
    assert sorted(pids) == list(range(ranks)), (pids, proc.poll())
    return proc, pids


@pytest.fixture(scope="module")
def slow_job(model, tmp_path_factory):
    """A job slow enough to kill in the middle (two requests at a time), and its rows from an
    uninterrupted run."""
    settings = dict(sampling={"max_new_tokens": 60}, engine={"max_batch_tokens": 16, "max_seqs": 1, "flush_seconds": 0.05})
    job, out = write_job(tmp_path_factory.mktemp("slow"), model, prompt_lines(80, seed=7), **settings)
    done = mpinfer(2, "run", job)
    assert done.returncode == 0, done.stderr
    return settings, rows_by_id(out)


def assert_kept_then_resumed(job, out, reference):
    """The stopped job's file is valid and holds some of the 80 rows, each as in the
    reference; running the job again completes it with exactly the reference rows."""
    kept = rows_by_id(out)
    assert 2 <= len(kept) < 80, len(kept)
    assert all(reference[i] == row for i, row in kept.items())
    done = mpinfer(2, "run", job)
    assert done.returncode == 0, done.stderr
    assert_complete(out, 80)
    assert rows_by_id(out) == reference


@pytest.mark.parametrize("victim", [0, 1])
def test_kill9_then_resume(model, slow_job, tmp_path, victim):
    settings, reference = slow_job
    job, out = write_job(tmp_path, model, prompt_lines(80, seed=7), **settings)
    proc, pids = start_and_wait_for_rows(job, out)
    os.kill(pids[victim], signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert_kept_then_resumed(job, out, reference)


def test_random_kill9_several_times(model, slow_job, tmp_path):
    """SIGKILL to a random rank at a random moment (from start-up to the middle of the job),
    five times in a row on the same job, each time resuming it (2 ranks, then tp 2 x pp 2 on
    4): the file stays readable, every kept row is the uninterrupted run's, no id twice, and
    the last run completes it to exactly the reference."""
    settings, reference = slow_job
    job, out = write_job(tmp_path, model, prompt_lines(80, seed=7), **settings)
    rng = np.random.default_rng(11)
    kept = 0
    for round_ in range(5):
        ranks, sets = (2, ()) if round_ % 2 == 0 else (4, ("parallel.tp=2", "parallel.pp=2"))
        cmd = [os.path.join(BIN, "mpiexec"), "-n", str(ranks), os.path.join(BIN, "mpinfer"), "run", str(job)]
        proc = subprocess.Popen(cmd + [x for s in sets for x in ("--set", s)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while len(rank_pids(job)) < ranks and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 3.0))  # start-up, loading, or generating
        pids = rank_pids(job)
        victim = int(rng.integers(ranks))
        if victim in pids:
            os.kill(pids[victim], signal.SIGKILL)
        proc.communicate(timeout=60)
        if out.exists():
            rows = read_rows(out)
            assert len(set(rows["id"])) == len(rows["id"])
            now = rows_by_id(out)
            assert all(reference[i] == row for i, row in now.items())
            assert len(now) >= kept
            kept = len(now)
    assert kept < 80  # the kills did interrupt it
    done = mpinfer(2, "run", job)
    assert done.returncode == 0, done.stderr
    assert_complete(out, 80)
    rows = read_rows(out)
    assert len(rows["id"]) == len(set(rows["id"])) == 80
    assert rows_by_id(out) == reference


@pytest.mark.parametrize("ranks, sets", [(2, ()), (4, ("parallel.tp=2", "parallel.pp=2"))])
def test_sigterm_stops_resumably(model, slow_job, tmp_path, ranks, sets):
    """SLURM's time limit: SIGTERM to every rank; exit code 75, nothing lost, rerun completes
    (also with a pipeline of tensor-parallel stages, which drains its micro-batches first)."""
    settings, reference = slow_job
    job, out = write_job(tmp_path, model, prompt_lines(80, seed=7), **settings)
    proc, pids = start_and_wait_for_rows(job, out, ranks, sets=sets)
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert_kept_then_resumed(job, out, reference)
    assert not os.path.exists(f"{out}.lock")


def test_invalid_lines_stop_the_job(model, tmp_path):
    lines = [json.dumps(x) for x in prompt_lines(4)]
    lines[1] = "{not json"
    lines.append(json.dumps({"id": "q0", "prompt": "again"}))
    lines.append(json.dumps({"prompt": "hello " * 600}))
    job, out = write_job(tmp_path, model, [])
    prompts = tmp_path / "job.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    out.write_bytes(b"earlier results")
    done = mpinfer(2, "run", job)
    assert done.returncode == 2
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in ("job.jsonl", "3 invalid lines", "line 2", "line 5", "duplicate id 'q0'", "line 6", "context"):
        assert text in err, err
    assert out.read_bytes() == b"earlier results"
    out.unlink()
    done = mpinfer(2, "run", job, "--skip-invalid")
    assert done.returncode == 0, done.stderr
    rows = read_rows(out)
    assert list(rows["index"]) == list(range(6)) and len(set(rows["id"])) == 6
    assert [reason == "error" for reason in rows["finish_reason"]] == [False, True, False, False, True, True]
    assert rows["id"][4] == "q0@line5" and "duplicate id 'q0'" in rows["error"][4]


@pytest.mark.parametrize("change, expected", [
    ("[sampling\n", "job.toml"),
    ("[sampling]\ntopk = 3\n", "sampling.topk"),
    ("[parallel]\ntp = \"two\"\n", "parallel.tp"),
    ("[model]\npath = \"/no/such/model\"\n", "model.path"),
    ("[input]\npath = \"/no/such/prompts.jsonl\"\n", "input.path"),
])
def test_bad_job_file(model, tmp_path, change, expected):
    job, out = write_job(tmp_path, model, prompt_lines(2))
    text = job.read_text()
    section = change.split("]")[0] + "]" if "]" in change else None
    if section and section in text:  # replace that section's lines by the bad ones
        head, _, rest = text.partition(section + "\n")
        rest = rest.split("\n", 1)[1] if rest else ""
        text = head + change + rest
    else:
        text += change
    job.write_text(text)
    out.write_bytes(b"earlier results")
    done = mpinfer(2, "run", job)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and expected in err, err
    assert out.read_bytes() == b"earlier results"


def test_results_of_another_job_are_refused(model, tiny_model, tmp_path):
    job, out = write_job(tmp_path, model, prompt_lines(3))
    assert mpinfer(1, "run", job).returncode == 0
    before = out.read_bytes()
    (tmp_path / "job.jsonl").write_text(json.dumps({"prompt": "something else"}) + "\n")
    done = mpinfer(1, "run", job)
    assert done.returncode == 2 and "different job (prompts differ)" in done.stderr and "--overwrite" in done.stderr
    assert out.read_bytes() == before
    done = mpinfer(1, "run", job, "--set", f"model.path={tiny_model('llama_bias')}")
    assert done.returncode == 2 and "different job (model, prompts differ)" in done.stderr, done.stderr
    assert out.read_bytes() == before
    done = mpinfer(1, "run", job, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert_complete(out, 1)
    # a complete job run again changes nothing
    before = out.read_bytes()
    done = mpinfer(1, "run", job)
    assert done.returncode == 0 and "already complete" in done.stdout
    assert out.read_bytes() == before


def test_set_overrides_and_metrics(model, tmp_path):
    job, out = write_job(tmp_path, model, prompt_lines(5))
    done = mpinfer(1, "run", job, "--set", "sampling.max_new_tokens=4", "--set", f"output.path={tmp_path / 'other.h5'}")
    assert done.returncode == 0, done.stderr
    assert not out.exists()
    with h5py.File(tmp_path / "other.h5", "r") as f:
        assert "max_new_tokens = 4" in f.attrs["job"]
        assert json.loads(f.attrs["layout"])["world"] == 1
        lengths = [len(x) for x in f["requests/output_ids"][:]]
        latency, ttft = f["requests/latency_s"][:], f["requests/ttft_s"][:]
        attrs = dict(f.attrs)
    assert max(lengths) <= 4
    assert attrs["generated_tokens"] == sum(lengths) and attrs["requests"] == 5
    assert attrs["throughput_tok_s"] == pytest.approx(sum(lengths) / attrs["wall_s"])
    assert 0 < attrs["startup_s"] < attrs["wall_s"]
    assert np.all(ttft <= latency) and attrs["ttft_p50_s"] <= attrs["ttft_p99_s"] <= ttft.max() + 1e-9
    assert 0 < attrs["tpot_p50_s"] <= attrs["tpot_p90_s"] <= latency.max()


def test_request_larger_than_the_kv_cache_is_refused(model, tmp_path):
    job, out = write_job(tmp_path, model, prompt_lines(3), engine={"kv_cache_gb": 0.0001})
    done = mpinfer(1, "run", job, "--set", "sampling.max_new_tokens=200")
    assert done.returncode == 2, done.stderr
    assert "engine.kv_cache_gb" in done.stderr and "line 1" in done.stderr, done.stderr
    assert not out.exists()


def test_bad_input_on_one_rank_only(model, tmp_path):
    """A path that exists on one node only: one line naming the rank, exit 2, no hang."""
    for home in ("home0", "home1"):
        (tmp_path / home).mkdir()
    os.symlink(model, tmp_path / "home0" / "m")
    job, out = write_job(tmp_path, "~/m", prompt_lines(2))
    run = [os.path.join(BIN, "mpinfer"), "run", str(job)]
    cmd = [os.path.join(BIN, "mpiexec"), "-n", "1", "env", f"HOME={tmp_path / 'home0'}", *run, ":",
           "-n", "1", "env", f"HOME={tmp_path / 'home1'}", *run]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mpinfer: error: rank 1: ") and "home1/m does not exist" in err
    assert not out.exists()
