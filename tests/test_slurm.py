"""The slurm/ scripts submitted with sbatch to a private single-node SLURM
(slurm/private-cluster.sh), MPINFER_RANKS_PER_NODE standing in for nodes: results equal to
one rank's for one node, TP inside nodes x PP across them, and MoE experts across nodes;
SLURM's warning signal stops a job resumably, and MPINFER_REQUEUE requeues it."""

import os
import re
import shutil
import subprocess
import time

import pytest

from mpinfer.io.results import read_rows
from test_run import BIN, assert_complete, mpinfer, prompt_lines, rows_by_id, write_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "slurm", "private-cluster.sh")
SCRIPT = os.path.join(ROOT, "slurm", "single-node.sbatch")
MULTI_NODE = os.path.join(ROOT, "slurm", "multi-node.sbatch")
MOE_EP = os.path.join(ROOT, "slurm", "moe-ep.sbatch")
SBIN = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # the daemons
MISSING = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
           if shutil.which(b, path=SBIN) is None]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment of a private SLURM cluster, stopped at the end even after failures.
    Missing binaries fail the tests rather than skip them: only a missing GPU may skip."""
    if MISSING:
        pytest.fail(f"SLURM binaries missing: {', '.join(MISSING)} (bash .ci/setup mpi,test installs slurm-wlm and "
                    "munge as root)")
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", CLUSTER, "start", str(folder)], capture_output=True, text=True, timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        conf = re.fullmatch(r"export SLURM_CONF=(\S+)\n", started.stdout).group(1)
        yield {**os.environ, "SLURM_CONF": conf, "MPINFER_VENV": os.path.dirname(BIN)}
    finally:
        subprocess.run(["bash", CLUSTER, "stop", str(folder)], timeout=60)


def submit(env, folder, *args):
    """sbatch SCRIPT args in folder; returns the job id."""
    done = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


# a job slow enough to signal in the middle (one request at a time)
SLOW = dict(sampling={"max_new_tokens": 60}, engine={"max_batch_tokens": 16, "max_seqs": 1, "flush_seconds": 0.05})


def job_state(env, job_id):
    """(JobState, exit code) from scontrol; no accounting on the private cluster."""
    text = _show(env, job_id)
    state = re.search(r"JobState=(\S+)", text).group(1)
    return state, int(re.search(r" ExitCode=(\d+):", text).group(1))


def test_two_ranks_equal_one(slurm, tiny_model, tmp_path):
    model = tiny_model("llama")
    lines = prompt_lines(8)
    ref_job, ref_out = write_job(tmp_path / "ref", model, lines)
    done = mpinfer(1, "run", ref_job)
    assert done.returncode == 0, done.stderr
    job, out = write_job(tmp_path / "slurm", model, lines)
    waited = subprocess.run(["sbatch", "--wait", "-n", "2", SCRIPT, job], cwd=tmp_path, env=slurm,
                            capture_output=True, text=True, timeout=180)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert waited.returncode == 0, waited.stderr + logs
    assert_complete(out, 8)
    assert rows_by_id(out) == rows_by_id(ref_out)


def test_warning_signal_stops_resumably(slurm, tiny_model, tmp_path):
    """scancel --signal=USR1 (what --signal=USR1@120 sends before the time limit): exit code
    75 within 10 s, the rows kept are the uninterrupted run's, submitting again completes."""
    model = tiny_model("llama")
    ref_job, ref_out = write_job(tmp_path / "ref", model, prompt_lines(60, seed=7), **SLOW)
    job, out = write_job(tmp_path / "slurm", model, prompt_lines(60, seed=7), **SLOW)
    done = mpinfer(2, "run", ref_job)
    assert done.returncode == 0, done.stderr
    reference = rows_by_id(ref_out)
    job_id = submit(slurm, tmp_path, "-n", "2", SCRIPT, job)
    deadline = time.time() + 60
    while not (out.exists() and _rows(out) >= 2) and time.time() < deadline:
        time.sleep(0.02)
    assert job_state(slurm, job_id)[0] == "RUNNING"
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm, check=True, timeout=10)
    while job_state(slurm, job_id)[0] in ("RUNNING", "COMPLETING") and time.time() < signalled + 30:
        time.sleep(0.1)
    took = time.time() - signalled
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert job_state(slurm, job_id) == ("FAILED", 75), logs
    assert took < 10, took
    kept = rows_by_id(out)
    assert 2 <= len(kept) < 60, len(kept)
    assert all(reference[i] == row for i, row in kept.items())
    job_id = submit(slurm, tmp_path, "-n", "2", SCRIPT, job)
    while job_state(slurm, job_id)[0] in ("PENDING", "RUNNING", "COMPLETING") and time.time() < deadline + 120:
        time.sleep(0.2)
    assert job_state(slurm, job_id) == ("COMPLETED", 0), logs
    assert_complete(out, 60)
    assert rows_by_id(out) == reference


@pytest.mark.parametrize("arch, script, layout", [
    ("llama", MULTI_NODE, ["--set", "parallel.tp=2", "--set", "parallel.pp=2"]),  # tp in a "node", pp across
    ("mixtral", MOE_EP, ["--set", "parallel.ep=4"]),  # 4 replicas, their experts over 2 "nodes"
])
def test_multi_node_scripts_equal_one_rank(slurm, tiny_model, tmp_path, arch, script, layout):
    model = tiny_model(arch)
    lines = prompt_lines(8)
    ref_job, ref_out = write_job(tmp_path / "ref", model, lines)
    done = mpinfer(1, "run", ref_job)
    assert done.returncode == 0, done.stderr
    job, out = write_job(tmp_path / "slurm", model, lines)
    waited = subprocess.run(["sbatch", "--wait", "-n", "4", script, job, *layout], cwd=tmp_path,
                            env={**slurm, "MPINFER_RANKS_PER_NODE": "2"}, capture_output=True, text=True, timeout=180)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert waited.returncode == 0, waited.stderr + logs
    assert "2 nodes of 2 ranks" in logs, logs  # the mapping table's summary line
    assert_complete(out, 8)
    assert rows_by_id(out) == rows_by_id(ref_out)


def test_requeue_after_the_warning_signal(slurm, tiny_model, tmp_path):
    """MPINFER_REQUEUE=1: the stopped job (exit 75) requeues itself; once eligible again it
    continues the results file to the uninterrupted run's rows."""
    model = tiny_model("llama")
    ref_job, ref_out = write_job(tmp_path / "ref", model, prompt_lines(30, seed=3), **SLOW)
    job, out = write_job(tmp_path / "slurm", model, prompt_lines(30, seed=3), **SLOW)
    done = mpinfer(1, "run", ref_job)
    assert done.returncode == 0, done.stderr
    env = {**slurm, "MPINFER_REQUEUE": "1"}
    job_id = submit(env, tmp_path, "-n", "2", SCRIPT, job)
    deadline = time.time() + 120
    while not (out.exists() and _rows(out) >= 2) and time.time() < deadline:
        time.sleep(0.02)
    subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True, timeout=10)
    while "Restarts=1" not in _show(env, job_id) and time.time() < deadline:
        time.sleep(0.1)
    kept = _rows(out)
    assert "Restarts=1" in _show(env, job_id) and 2 <= kept < 30, (kept, _show(env, job_id))
    # SLURM holds a requeued job for a while (BeginTime); a test need not wait for it
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True, timeout=10)
    while job_state(env, job_id)[0] != "COMPLETED" and time.time() < deadline + 120:
        time.sleep(0.2)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert job_state(env, job_id) == ("COMPLETED", 0), logs  # (the restart rewrote slurm-ID.out)
    assert_complete(out, 30)
    assert rows_by_id(out) == rows_by_id(ref_out)


def _show(env, job_id):
    return subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout


def _rows(path):
    try:
        return len(read_rows(path)["id"])
    except OSError:  # being replaced right now
        return 0
