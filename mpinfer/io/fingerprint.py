"""What identifies a job's results: a run refuses to resume a results file with another
fingerprint, and `mpinfer merge` joins only shard files of the job it is given."""

import dataclasses
import hashlib
import json
import os


def fingerprint(job, cfg):
    """Identity of a job's results, as a results file holds it (JSON: lists, not tuples): the
    model, the prompt file's bytes, the sampling defaults and, for a job array task, its shard
    ("1/4"). The layout is not part of it: it does not change the tokens. cfg: the model's
    config (checkpoint.config)."""
    found = {"model": _model_identity(job.model_path, cfg), "prompts": _sha256(job.input_path),
             "sampling": dataclasses.asdict(job.sampling)}
    if job.shard:
        found["shard"] = str(job.shard)
    return json.loads(json.dumps(found))


def _model_identity(path, cfg):
    """What makes two models the same for resuming: the config and the files' names and sizes
    (hashing tens of GB of weights at every start would cost minutes)."""
    files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
    return {"config": json.loads(cfg.to_json()),
            "files": [[os.path.basename(f), os.path.getsize(f)] for f in files if os.path.isfile(f)]}


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
