"""The results file (DESIGN.md section 1): one HDF5 file, written by rank 0 while a job runs.

Crash safety. HDF5 has no journal, so a process killed while it writes can leave a file
that no longer opens. We therefore never modify `path` in place: each flush copies `path`
to `path + ".tmp"`, appends the new rows to the copy, fsyncs it and renames it onto `path`
(then fsyncs the folder). A SIGKILL at any moment leaves `path` as it was after the last
completed flush; the half-written tmp is deleted when the job is opened again.

The copy makes a flush O(file size), so callers must flush less often as the file grows:
the engine flushes at most every max(flush_seconds, 10 * last_flush_s) seconds, which keeps
flushing below about 10% of the run time.

Layout: root attributes (the caller's attrs, `fingerprint` JSON, `complete`, `wall_s`, and the
run metrics after finish()) and group `/requests`, one row per finished request, every
dataset of the same length, resizable, chunked by CHUNK rows. Statistics of the whole job
that are not per request (e.g. `/moe/expert_load`) are further datasets outside `/requests`,
each with a `description` attribute, replaced whole by the flush after set_arrays().
"""

import fcntl
import json
import os
import shutil
import time
from collections import Counter

import h5py
import numpy as np

from mpinfer.errors import UserError

STR = h5py.string_dtype("utf-8")
CHUNK = 1024  # rows per chunk: 16 KiB for a vlen column (one 16-byte heap reference per row)

# name -> (HDF5 dtype, description attribute); every record carries exactly these keys
COLUMNS = {
    "id": (STR, "request id (from the prompt file, default its 0-based line number)"),
    "index": (np.dtype(np.int64), "0-based line of the request in the prompt file"),
    "prompt_ids": (h5py.vlen_dtype(np.int32), "token ids of the prompt, as fed to the model"),
    "output_ids": (h5py.vlen_dtype(np.int32), "generated token ids"),
    "output_text": (STR, "generated text, decoded from output_ids (a NUL character, which HDF5 "
                         "strings cannot hold, is stored as U+FFFD)"),
    "logprobs": (h5py.vlen_dtype(np.float32), "log-probability of each generated token"),
    "top_logprob_ids": (h5py.vlen_dtype(np.int32),
                        "top-N token ids, flattened (output token, N) per row, N = len / len(output_ids); "
                        "empty when not asked for"),
    "top_logprobs": (h5py.vlen_dtype(np.float32), "log-probabilities of top_logprob_ids, same shape"),
    "finish_reason": (STR, "stop | length | error"),
    "error": (STR, "why the request failed when finish_reason is error, else empty"),
    "ttft_s": (np.dtype(np.float64), "seconds from the request's arrival at its replica to its first generated token"),
    "latency_s": (np.dtype(np.float64), "seconds from the request's arrival at its replica to its last generated token"),
}
# Root attributes that are not run metrics (summary() reports every other one as a metric).
NOT_METRICS = {"mpinfer_version", "job", "layout", "model", "fingerprint", "complete", "wall_s"}


class ResultsFile:
    """The results file of one job, opened for resume or prepared afresh; see the module docstring.

    Attributes: done (indices finished by earlier runs), complete (the existing file was a
    finished job), rows_written (rows in the file after the last flush), last_flush_s
    (duration of the last flush), wall_s_before (wall time recorded by earlier runs), arrays
    ({"moe/expert_load": (array, description)}: the datasets outside /requests, as the
    existing file holds them until set_arrays() replaces them).
    """

    def __init__(self, path, fingerprint: dict, attrs: dict, overwrite=False):
        """Open (or prepare) the results file of a job.

        fingerprint: JSON-able dict identifying the job's results (model identity, prompt file
        hash, sampling defaults), stored as root attribute `fingerprint`. An existing file must
        hold the same fingerprint, unless overwrite, in which case it is ignored and replaced at
        the first flush (not deleted up front). attrs: root attributes (str/int/float/bool)
        written on every flush, e.g. mpinfer_version, job (TOML text), layout and model (JSON).
        Nothing is written until the first flush.
        """
        self.path = os.fspath(path)
        self.tmp = self.path + ".tmp"
        # A round trip through JSON, so that tuples and lists compare equal to what a file holds.
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.attrs = dict(attrs)
        self.done, self.complete, self.rows_written, self.wall_s_before = set(), False, 0, 0.0
        self.last_flush_s = 0.0
        self.arrays, self._arrays_changed = {}, False
        self._records, self._added = [], set()  # buffered until the next flush
        try:  # fails here, before any compute, when the folder is not writable
            with open(self.tmp, "wb"):  # also truncates a tmp left by a run killed mid-flush
                pass
            os.remove(self.tmp)
        except OSError as e:
            raise UserError(f"{self.path}: cannot write the results file here ({e.strerror})") from None
        self._on_disk = os.path.exists(self.path) and not overwrite  # flushes extend `path`
        if not self._on_disk:
            return
        with open_results(self.path, " (use --overwrite to replace it)") as f:
            held = json.loads(f.attrs["fingerprint"])
            differ = sorted(k for k in held.keys() | self.fingerprint.keys()
                            if held.get(k) != self.fingerprint.get(k))
            if differ:
                raise UserError(f"{self.path} holds results of a different job ({', '.join(differ)} differ); "
                                "use --overwrite to start afresh or choose another output.path")
            index = f["requests/index"][()]
            self.done = set(index.tolist())
            self.rows_written = len(index)
            self.complete = bool(f.attrs.get("complete", False))
            self.wall_s_before = float(f.attrs.get("wall_s", 0.0))
            self.arrays = _read_arrays(f)

    def add(self, records: list[dict]):
        """Buffer finished requests until the next flush. Each index may be added once per job."""
        for r in records:
            if r.keys() != COLUMNS.keys():
                raise ValueError(f"result record keys {sorted(r)} are not {sorted(COLUMNS)}")
            if r["index"] in self.done or r["index"] in self._added:
                raise ValueError(f"request index {r['index']} was already added to {self.path}")
            self._added.add(r["index"])
            self._records.append(r)

    def set_arrays(self, arrays: dict):
        """Replace the datasets outside /requests: {"group/name": (array, description)}."""
        self.arrays, self._arrays_changed = dict(arrays), True

    def flush(self, wall_s: float):
        """Write the buffered rows and arrays (if any, or if the file does not exist yet) with
        wall_s = wall_s_before + wall_s and complete=False. wall_s: this run's wall time so far."""
        if not self._records and not self._arrays_changed and self._on_disk:
            return
        start = time.perf_counter()
        if self._on_disk:
            shutil.copyfile(self.path, self.tmp)
            f = h5py.File(self.tmp, "r+")
        else:
            f = _create(self.tmp)
        with f:
            self.rows_written = _append(f["requests"], _columns(self._records))
            _write_arrays(f, self.arrays)
            _set_attrs(f, {**self._root_attrs(wall_s), "complete": False})
        self._replace()
        self._records, self._arrays_changed = [], False
        self.last_flush_s = time.perf_counter() - start

    @property
    def rows(self):
        """Rows of the job so far: in the file and buffered."""
        return len(self.done) + len(self._added)

    def finish(self, wall_s: float, metrics):
        """Rewrite the whole file with every row sorted by index, complete=True and `metrics`
        (str/int/float/bool values) as root attributes. The datasets depend only on the rows.
        metrics: a dict, or a function of the rows ({name: values}, sorted) returning one, so
        that they come from the same single read of the file. Returns the metrics written."""
        start = time.perf_counter()
        cols = {name: [] for name in COLUMNS}
        if self._on_disk:
            cols = {name: list(values) for name, values in read_rows(self.path).items()}
        for name, values in _columns(self._records).items():
            cols[name] += values
        order = np.argsort(np.asarray(cols["index"], np.int64), kind="stable")  # indices are unique
        rows = {name: [v[i] for i in order] for name, v in cols.items()}
        if callable(metrics):
            metrics = metrics(rows)
        clash = metrics.keys() & (self.attrs.keys() | NOT_METRICS)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} clash with root attributes of the results file")
        with _create(self.tmp) as f:
            self.rows_written = _append(f["requests"], rows)
            _write_arrays(f, self.arrays)
            _set_attrs(f, {**self._root_attrs(wall_s), "complete": True, **metrics})
        self._replace()
        self._records = []
        self.complete = True
        self.last_flush_s = time.perf_counter() - start
        return metrics

    def _root_attrs(self, wall_s):
        return {**self.attrs, "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                "wall_s": self.wall_s_before + wall_s}

    def _replace(self):
        """Make the closed tmp durable, then atomically put it in place of `path`."""
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.path)
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)  # the rename itself survives a power loss
        finally:
            os.close(fd)
        self._on_disk = True


def lock(path):
    """An exclusive lock on path + ".lock", held until the returned descriptor is closed (or
    the process ends), so that two runs of one job (a requeue that overlaps the original, a
    double submission) cannot overwrite each other's flushes. Take it before ResultsFile()."""
    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{path}: cannot write the results file here ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{path} is being written by another mpinfer run (it holds {path}.lock)") from None
    return fd


def open_results(path, hint=""):
    """Open an existing results file read-only; UserError (ending with `hint`) if it is not one."""
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path}: not an mpinfer results file{hint}") from None
    if "fingerprint" not in f.attrs or "requests" not in f or "index" not in f["requests"]:
        f.close()
        raise UserError(f"{path}: not an mpinfer results file{hint}")
    return f


def _create(path):
    """A new, empty results file at `path`, opened for writing."""
    f = h5py.File(path, "w")
    group = f.create_group("requests")
    for name, (dtype, description) in COLUMNS.items():
        ds = group.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(CHUNK,), dtype=dtype)
        ds.attrs["description"] = description
    return f


def _columns(records):
    """Records -> {name: list of values}, each value a str, a 1-D array of the column's base type,
    or a scalar."""
    cols = {}
    for name, (dtype, _) in COLUMNS.items():
        base = h5py.check_vlen_dtype(dtype)
        if base is str:  # HDF5 strings end at NUL: a generated NUL is stored as U+FFFD
            cols[name] = [r[name].replace("\0", "\ufffd") for r in records]
        elif base is None:
            cols[name] = [r[name] for r in records]
        else:  # ravel: top_logprob_ids may come as a (tokens, N) array
            cols[name] = [np.asarray(r[name], base).ravel() for r in records]
    return cols


def _append(group, cols):
    """Append rows to every dataset of /requests; returns the new row count."""
    n = len(group["index"])
    m = len(cols["index"])
    for name, (dtype, _) in COLUMNS.items():
        ds = group[name]
        ds.resize((n + m,))
        if h5py.check_vlen_dtype(dtype) is None:
            values = np.asarray(cols[name], dtype)
        else:  # filled one by one: rows of equal length must not become a 2-D array
            values = np.empty(m, dtype)
            for i, v in enumerate(cols[name]):
                values[i] = v
        if m:  # write_direct: `ds[n:] = values` would still guess a 2-D shape (and fail on all-empty rows)
            ds.write_direct(values, dest_sel=np.s_[n:])
    return n + m


def _write_arrays(f, arrays):
    for name, (array, description) in arrays.items():
        if name in f:
            del f[name]
        f.create_dataset(name, data=array).attrs["description"] = description


def _read_arrays(f):
    """{"group/name": (array, description)} of every dataset outside /requests."""
    found = {}

    def visit(name, obj):  # returns None: visititems stops at the first other value
        if isinstance(obj, h5py.Dataset) and not name.startswith("requests/"):
            found[name] = (obj[()], obj.attrs.get("description", ""))

    f.visititems(visit)
    return found


def _set_attrs(f, attrs):
    """Write root attributes, skipping unchanged ones: rewriting a long string attribute (the
    job TOML) on every flush would leave its old copy behind in the file each time."""
    for name, value in attrs.items():
        if name not in f.attrs or _plain(f.attrs[name]) != value:
            f.attrs[name] = value


def _plain(value):
    """An attribute as h5py returns it (NumPy scalar or str) -> a plain JSON-able value."""
    return value.item() if isinstance(value, np.generic) else value


def read_rows(path) -> dict:
    """Every dataset of /requests: strings as lists of str, ragged columns as lists of 1-D arrays,
    scalar columns as arrays. UserError if `path` is not a results file."""
    with open_results(path) as f:
        rows = {}
        for name, ds in f["requests"].items():
            base = h5py.check_vlen_dtype(ds.dtype)
            if base is str:
                rows[name] = ds.asstr()[()].tolist()
            elif base is not None:
                rows[name] = list(ds[()])
            else:
                rows[name] = ds[()]
        return rows


def summary(path) -> dict:
    """A JSON-able summary of a results file, for `mpinfer inspect`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    with open_results(path) as f:
        attrs = {name: _plain(value) for name, value in f.attrs.items()}
        requests = f["requests"]
        out = {
            "path": path,
            "complete": bool(attrs.get("complete", False)),
            "rows": len(requests["index"]),
            "finish_reasons": dict(sorted(Counter(requests["finish_reason"].asstr()[()].tolist()).items())),
            "prompt_tokens": int(sum(len(ids) for ids in requests["prompt_ids"][()])),
            "generated_tokens": int(sum(len(ids) for ids in requests["output_ids"][()])),
            "wall_s": float(attrs.get("wall_s", 0.0)),
            "mpinfer_version": attrs.get("mpinfer_version"),
            "metrics": {name: value for name, value in sorted(attrs.items()) if name not in NOT_METRICS},
        }
        if "moe" in f:  # per MoE layer: max / mean load over experts and over EP ranks, pairs dropped
            moe = f["moe"]
            out["moe"] = {str(layer): {"imbalance": round(float(a), 3), "rank_imbalance": round(float(b), 3),
                                       "dropped": int(c)}
                          for layer, a, b, c in zip(moe["layers"][()], moe["imbalance"][()], moe["rank_imbalance"][()],
                                                    moe["dropped"][()])}
    for name in ("layout", "model"):
        if name in attrs:
            out[name] = json.loads(attrs[name])
    return out


def request_metrics(rows):
    """Metrics of the finished requests of /requests rows (read_rows): counts of requests and
    tokens, and the 50/90/99th percentiles of time to first token and time per output token."""
    ok = [i for i, reason in enumerate(rows["finish_reason"]) if reason != "error"]
    n_out = np.array([len(rows["output_ids"][i]) for i in ok], dtype=np.int64)
    ttft = np.array([rows["ttft_s"][i] for i in ok])
    latency = np.array([rows["latency_s"][i] for i in ok])
    multi = n_out > 1
    tpot = (latency[multi] - ttft[multi]) / (n_out[multi] - 1)
    m = {"requests": len(ok), "generated_tokens": int(n_out.sum()),
         "prompt_tokens": int(sum(len(rows["prompt_ids"][i]) for i in ok))}
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        for q in (50, 90, 99):
            m[f"{name}_p{q}_s"] = float(np.percentile(values, q)) if len(values) else 0.0
    return m
