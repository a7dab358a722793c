"""The layout planner: every layout a cluster allows, ranked by the cost model (costmodel.py)
for an objective, and the reason for the best one in plain words.

`mpinfer plan` prints ranked() as a table with explain(); `parallel.auto = true` in a job
calls choose_layout() with the actual world.
"""

import dataclasses
import os

from .config import load_hf_config
from .costmodel import USABLE_MEMORY, Cluster, Layout, Workload, estimate
from .errors import UserError
from .layers import check_tp
from .mapping import Mapping
from .moe import check_ep
from .presets import GB, GPUS, INTER, INTRA, MODELS
from .weights import open_checkpoint

OBJECTIVES = ("throughput", "latency")
NAMES = {"compute": "compute", "memory": "memory traffic", "tp": "TP all-reduces", "pp": "pipeline sends",
         "ep": "EP all-to-alls", "cp": "CP ring", "bubble": "pipeline bubble"}


def _divisors(n):
    return [k for k in range(1, n + 1) if n % k == 0]


def layouts(cfg, cluster):
    """Every layout the cluster's world allows and the engine runs: mapping.py's rules (TP
    inside a node, the two EP patterns), TP and EP dividing the model (layers.check_tp,
    moe.check_ep), no more stages than layers; micro-batches = pp, the engine's default."""
    world, found = cluster.world, []
    for tp in _divisors(cluster.gpus_per_node):
        try:
            check_tp(cfg, tp)
        except UserError:
            continue
        for cp in _divisors(world // tp):
            for pp in _divisors(world // (tp * cp)):
                if pp > cfg.num_layers:
                    continue
                dp = world // (tp * cp * pp)
                for ep in _divisors(cfg.num_experts) if cfg.num_experts else [1]:
                    try:
                        m = Mapping(world, 0, tp=tp, pp=pp, cp=cp, ep=ep, ranks_per_node=cluster.gpus_per_node)
                        check_ep(cfg, ep, m.moe_tp)
                    except (ValueError, UserError):
                        continue
                    found.append(Layout(dp, tp, pp, ep, cp, pp))
    return found


def rank(cfg, work, cluster, objective="throughput"):
    """Estimates of every layout that fits, best first for the objective (throughput: most
    generated tokens/s; latency: shortest request), ties to the other measure."""
    if objective not in OBJECTIVES:
        raise UserError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    estimates = [estimate(cfg, work, cluster, lay) for lay in layouts(cfg, cluster)]
    fitting = [e for e in estimates if e.fits]
    if not fitting:
        least = min(estimates, key=lambda e: e.memory["total"], default=None)
        need = f" (the least any layout needs is {least.memory['total'] / GB:.1f} GB, by {least.layout})" if least else ""
        raise UserError(f"no layout of {cluster.nodes} x {cluster.gpus_per_node} {cluster.gpu.name} holds the model and "
                        f"{work.batch} sequences of {work.prompt_len + work.gen_len} tokens per replica in "
                        f"{USABLE_MEMORY * cluster.gpu.memory / GB:.0f} GB usable per GPU{need}")
    key = ((lambda e: (-e.throughput, e.request_s)) if objective == "throughput" else
           (lambda e: (e.request_s, -e.throughput)))
    return sorted(fitting, key=key)


def cluster(nodes, gpus_per_node, gpu="h100", intra="nvlink", inter="ib-ndr", links=None, memory=None):
    """A Cluster from preset names; links ({"intra": Link, "inter": Link}, from a calibration
    profile) replace the presets they name; memory (bytes) replaces the GPU's."""
    for what, value, choices in (("GPU", gpu, GPUS), ("intra-node link", intra, INTRA), ("inter-node link", inter, INTER)):
        if value not in choices:
            raise UserError(f"unknown {what} {value!r}; one of {', '.join(choices)}")
    for what, n in (("nodes", nodes), ("GPUs per node", gpus_per_node)):
        if n < 1:
            raise UserError(f"{what} must be at least 1, got {n}")
    links = {"intra": INTRA[intra], "inter": INTER[inter], **(links or {})}
    g = GPUS[gpu] if memory is None else dataclasses.replace(GPUS[gpu], memory=memory)
    return Cluster(nodes, gpus_per_node, g, links["intra"], links["inter"])


def model_config(name):
    """A preset's ModelConfig, or the config of a Hugging Face folder (its config.json) or of a
    .gguf file (its metadata)."""
    if name in MODELS:
        return MODELS[name]
    if os.path.isdir(name):
        return load_hf_config(name)
    if name.endswith(".gguf"):
        return open_checkpoint(name).config
    raise UserError(f"unknown model {name!r}: a preset ({', '.join(MODELS)}), a Hugging Face folder or a .gguf file")


def choose_layout(cfg, world, ranks_per_node, gpu_memory_bytes, work=Workload(), objective="throughput",
                  gpu="h100", intra="nvlink", inter="ib-ndr", links=None):
    """For `parallel.auto = true`: (tp, pp, ep, cp, explanation) of the best layout of the
    actual world (ranks per node from the topology, memory read from the device; compute,
    bandwidth and links from the named presets or a calibration profile's links).
    work.batch is what a replica keeps in flight (engine.max_seqs)."""
    c = cluster(world // ranks_per_node, ranks_per_node, gpu, intra, inter, links, gpu_memory_bytes)
    ranked = rank(cfg, work, c, objective)
    best = ranked[0].layout
    return best.tp, best.pp, best.ep, best.cp, explain(ranked, objective, work)


# ----- words --------------------------------------------------------------------------------

def seconds(s):
    """A duration for people: 12 us, 3.4 ms, 2.10 s."""
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _shape(lay):
    gpus = lay.tp * lay.pp * lay.cp
    return f"{lay.dp} replica{'s' * (lay.dp > 1)} of {gpus} GPU{'s' * (gpus > 1)}"


def _per_token(e, work):
    """Seconds of each cost per generated token of the whole cluster (1 / throughput in all)."""
    return {k: v / (e.layout.dp * work.batch * work.gen_len) for k, v in e.parts.items()}


def explain(ranked, objective, work):
    """Why the first of ranked wins: its figures, where its time goes, and what separates it
    from the runner-up."""
    top = ranked[0]
    m = top.memory
    shares = sorted(((v / top.request_s, k) for k, v in top.parts.items() if v > 0), reverse=True)
    lines = [
        f"Best for {objective}: {top.layout} ({_shape(top.layout)}, {top.layout.micro_batches} micro-batch"
        f"{'es' * (top.layout.micro_batches > 1)} in flight).",
        f"Predicted {top.throughput:,.0f} generated tokens/s for the cluster; a request of {work.prompt_len} + "
        f"{work.gen_len} tokens takes {seconds(top.request_s)} (first token {seconds(top.ttft_s)}, then "
        f"{seconds(top.tpot_s)} per token) with {work.batch} sequences in flight per replica.",
        f"Memory per GPU: {m['total'] / GB:.1f} of {m['usable'] / GB:.1f} GB usable (weights {m['weights'] / GB:.1f}, "
        f"KV cache {m['kv'] / GB:.1f}, activations {m['activations'] / GB:.1f}).",
        "Where a request's time goes: " + ", ".join(f"{NAMES[k]} {share:.0%}" for share, k in shares if share >= 0.005)
        + f"; {NAMES[top.dominant]} dominates.",
    ]
    if len(ranked) > 1:
        lines.append(_versus(top, ranked[1], objective, work))
    return "\n".join(lines)


def _versus(top, second, objective, work):
    """One sentence: by how much the top layout beats the runner-up and which costs make it."""
    if objective == "throughput":
        margin = f"{top.throughput / second.throughput - 1:.1%} more tokens/s"
        ours, theirs, unit = _per_token(top, work), _per_token(second, work), " per token"
    else:
        margin = f"{1 - top.request_s / second.request_s:.1%} shorter requests"
        ours, theirs, unit = top.parts, second.parts, " per request"
    diff = sorted(((theirs[k] - ours[k], k) for k in ours), reverse=True)
    saves = [f"{NAMES[k]} ({seconds(d)} less{unit})" for d, k in diff if d > 0][:2]
    pays = [f"{NAMES[k]} ({seconds(-d)} more)" for d, k in diff[::-1] if d < 0][:2]
    text = f"Against the runner-up, {second.layout} ({_shape(second.layout)}): {margin}"
    if saves:
        text += "; it spends less on " + " and ".join(saves)
    if pays:
        text += "; it pays more for " + " and ".join(pays)
    return text + "."


def table(ranked, limit=10):
    """The ranked layouts as text lines, the best first."""
    head = (f"{'#':>3} {'layout':<26} {'GPUs/rep':>8} {'GB/GPU':>7} {'tok/s':>10} {'TTFT':>9} {'per token':>9} "
            f"{'request':>9}  dominant")
    lines = [head]
    for i, e in enumerate(ranked[:limit], 1):
        lay = e.layout
        lines.append(f"{i:>3} {str(lay):<26} {lay.tp * lay.pp * lay.cp:>8} {e.memory['total'] / GB:>7.1f} "
                     f"{e.throughput:>10,.0f} {seconds(e.ttft_s):>9} {seconds(e.tpot_s):>9} "
                     f"{seconds(e.request_s):>9}  {NAMES[e.dominant]}")
    if len(ranked) > limit:
        lines.append(f"    ... {len(ranked) - limit} more layouts fit")
    return lines
