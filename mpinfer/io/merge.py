"""`mpinfer merge`: the results files of a job array's tasks joined into the job's own file.

A job split over N array tasks (input.shard = "I/N", job.Shard) leaves N files next to its
output path, results.shard-I-of-N.h5, each a complete run of the lines whose number % N == I.
Before anything is written every one must exist, hold this job (its fingerprint is the job's
plus its shard: same model, prompt file bytes and sampling) and be complete; otherwise one
line lists what is wrong with each and nothing is written. The merged file is then written
the way a single run finishes its own (ResultsFile.finish: rows sorted by index, a temporary
file renamed over the output), so its /requests equal a single run's row for row.

Root attributes: `job` is the whole job (no shard), `layout` the first task's with
"array_tasks": N, and the metrics are combined: the counts and TTFT/TPOT percentiles come
from the merged rows as in a single run; `wall_s` and `startup_s` are the longest task's,
`throughput_tok_s` the sum of the tasks' (their rate side by side), `comm.*` calls and bytes
summed, `ranks.loaded` the ranks of every task, the /moe counts summed and their imbalance
recomputed; any other attribute is kept when every task has the same value. Each task's own
attributes are kept in `shards` (JSON, one object per task).
"""

import json
import os

import numpy as np

from .. import __version__
from ..errors import UserError
from ..job import Shard, load_job
from ..weights import open_checkpoint
from .fingerprint import fingerprint
from .results import request_metrics
from .results import COLUMNS, NOT_METRICS, ResultsFile, _plain, _read_arrays, lock, open_results, read_rows

_SHOWN = 5  # problems quoted in the error


def merge(job_file, overrides, count):
    """Write the job's results file from its `count` shard files; returns (path, rows)."""
    job = load_job(job_file, overrides)
    if job.shard:
        raise UserError(f'{job.path}: input.shard = "{job.shard}": merge joins the shards of the whole job; '
                        "leave input.shard unset and give their number with --shards")
    expected = fingerprint(job, open_checkpoint(job.model_path).config)
    shards = [Shard(i, count, job.output_path) for i in range(count)]
    problems = [p for s in shards if (p := _problem(s, expected))]
    if problems:
        more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        listed = "; ".join(problems[:_SHOWN]) + more
        raise UserError(f"merge: {len(problems)} of {count} shard files not ready: {listed}")
    _check_output(job.output_path, expected)
    lock(job.output_path)  # released when this process ends
    records, arrays, attrs = [], [], []
    for shard in shards:
        rows = read_rows(shard.path)
        records += [{name: rows[name][i] for name in COLUMNS} for i in range(len(rows["index"]))]
        with open_results(shard.path) as f:
            arrays.append(_read_arrays(f))
            attrs.append({name: _plain(value) for name, value in f.attrs.items()})
    layout = {**json.loads(attrs[0]["layout"]), "array_tasks": count}
    root = {"mpinfer_version": __version__, "job": job.toml(), "layout": json.dumps(layout), "model": attrs[0]["model"]}
    results = ResultsFile(job.output_path, expected, root, overwrite=True)
    results.add(records)
    moe = _moe_arrays(arrays)
    if moe:
        results.set_arrays(moe)
    results.finish(max(a["wall_s"] for a in attrs), lambda rows: _metrics(rows, attrs, moe))
    os.remove(job.output_path + ".lock")  # still held: no other run can be waiting on it
    return job.output_path, len(records)


def _problem(shard, expected):
    """What keeps one shard file from the merge, or None."""
    if not os.path.exists(shard.path):
        return f"{shard.path}: missing (run task {shard}: --set input.shard={shard})"
    try:
        with open_results(shard.path) as f:
            held = json.loads(f.attrs["fingerprint"])
            complete = bool(f.attrs.get("complete", False))
            rows = len(f["requests/index"])
    except UserError as e:
        return str(e)
    want = {**expected, "shard": str(shard)}
    differ = sorted(k for k in held.keys() | want.keys() if held.get(k) != want.get(k))
    if differ:
        return f"{shard.path}: results of another job ({', '.join(differ)} differ)"
    if not complete:
        return f"{shard.path}: not complete ({rows} requests done; run task {shard} again to finish it)"
    return None


def _check_output(path, expected):
    """The output may be replaced only when it is missing or holds this job's results."""
    if not os.path.exists(path):
        return
    hint = "; remove it or choose another output.path"
    with open_results(path, hint) as f:
        if json.loads(f.attrs["fingerprint"]) != expected:
            raise UserError(f"{path} holds results of a different job{hint}")


def _metrics(rows, attrs, moe):
    """The merged file's metrics (see the module docstring). rows: the merged /requests,
    sorted; attrs: each shard's root attributes."""
    m = request_metrics(rows) | {"throughput_tok_s": float(sum(a["throughput_tok_s"] for a in attrs)),
                                 "startup_s": float(max(a["startup_s"] for a in attrs))}
    if moe:
        m |= {"moe.imbalance_max": float(moe["moe/imbalance"][0].max()),
              "moe.rank_imbalance_max": float(moe["moe/rank_imbalance"][0].max()),
              "moe.dropped": int(moe["moe/dropped"][0].sum())}
    m["ranks.loaded"] = json.dumps([rank for a in attrs for rank in json.loads(a["ranks.loaded"])])
    for name in sorted({k for a in attrs for k in a} - m.keys() - NOT_METRICS):
        values = [a.get(name) for a in attrs]
        if name.startswith("comm."):
            m[name] = sum(v or 0 for v in values)
        elif all(v == values[0] for v in values):  # e.g. pp.micro_batches; differing ones are in `shards`
            m[name] = values[0]
    job_wide = NOT_METRICS - {"mpinfer_version", "layout", "wall_s"}  # job, model, ...: the merged file's own
    m["shards"] = json.dumps([{k: _json(v) for k, v in a.items() if k not in job_wide} for a in attrs])
    return m


def _json(value):
    """An attribute for the `shards` list: JSON text (layout, ranks.loaded) as its value."""
    return json.loads(value) if isinstance(value, str) and value[:1] in ("[", "{") else value


def _moe_arrays(arrays):
    """The /moe datasets of the merged file ({} for a dense model): the tasks' counts summed,
    the imbalance (max / mean per layer) recomputed, each task's `copies` the first's. EP ranks
    line up only when every task had the same EP size; otherwise rank_load is left empty
    (no columns) and its imbalance 1."""
    if not arrays[0]:
        return {}
    first = arrays[0]
    out = {name: first[name] for name in ("moe/layers", "moe/copies")}
    for name in ("moe/expert_load", "moe/rank_load", "moe/dropped"):
        counts = [a[name][0] for a in arrays]
        same = all(c.shape == counts[0].shape for c in counts)
        out[name] = (sum(counts) if same else np.zeros((len(counts[0]), 0), np.int64), first[name][1])
    for name, imbalance in (("moe/expert_load", "moe/imbalance"), ("moe/rank_load", "moe/rank_imbalance")):
        counts = out[name][0]  # (layers, experts or EP ranks)
        mean = counts.mean(axis=1) if counts.shape[1] else np.zeros(len(counts))
        ratio = np.where(mean > 0, counts.max(axis=1, initial=0) / np.maximum(mean, 1e-30), 1.0)
        out[imbalance] = (ratio, first[imbalance][1])
    return out
