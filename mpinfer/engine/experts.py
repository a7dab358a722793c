"""Expert statistics and hot-expert placement over a job (the MoE layer itself is moe.py).

Every rank's MoE layers count what they saw (moe.MoE.load, .computed, .dropped). Ranks of
one TP group inside a replica route the same tokens, so only one of them counts the routing
(tp rank 0) and one per EP rank counts the computing (the first slice); with EP across
replicas every rank routes and computes its own. At the end of every run the counts are
gathered over the world and rank 0 adds them to the results file's /moe datasets (an earlier
run's included): every token that passed through a layer counts, so tokens recomputed after
a preemption or a resume count again.

Hot-expert replication needs each MoE layer's load before the job: from /moe/expert_load of
an earlier results file (moe.load_from), or from a routing pass: every replica prefills its
share of the job's first ROUTING_PROMPTS prompts (one token generated, nothing written), and
the summed counts choose the copies (moe.Placement) before the real run starts.
"""

import dataclasses

import numpy as np

from ..errors import UserError
from ..io.results import open_results
from . import dispatch

ROUTING_PROMPTS = 64

DESCRIPTIONS = {
    "moe/layers": "index of each MoE layer (rows of the other /moe datasets)",
    "moe/expert_load": "(layer, expert) routed (token, expert) pairs over the job: "
                       "sum over experts = tokens routed x experts per token",
    "moe/imbalance": "per layer: max / mean of expert_load over the experts",
    "moe/rank_load": "(layer, EP rank) pairs the experts of each EP rank computed (hot copies included), "
                     "summed over EP groups",
    "moe/rank_imbalance": "per layer: max / mean of rank_load over the EP ranks",
    "moe/dropped": "per layer: pairs that skipped their expert over the capacity limit",
    "moe/copies": "(layer, expert) copies of each expert in the EP group (1 = no replica)",
}


def _across(m):
    return m.tp % m.ep != 0


def local_stats(model, m):
    """JSON-able counts of this rank's MoE layers; None where another rank counts the same."""
    routes, computes = _across(m) or m.tp_rank == 0, _across(m) or m.moe_tp_rank == 0
    return {str(layer): {"load": moe.load.tolist() if routes else None, "dropped": moe.dropped if routes else 0,
                         "rank": m.ep_rank, "computed": int(moe.computed.sum()) if computes else 0,
                         "copies": moe.placement.copies.tolist()}
            for layer, moe in model.moe_layers().items()}


def gather(comm, model, m):
    """Collective over comm: every rank's local_stats summed; {layer: {"load" (E,), "dropped",
    "rank_load" (ep,), "copies" (E,)}} for every MoE layer of the model."""
    merged = {}
    for stats in dispatch.allgather(comm, local_stats(model, m)):
        for layer, s in stats.items():
            got = merged.setdefault(int(layer), {"load": np.zeros(len(s["copies"]), np.int64), "dropped": 0,
                                                 "rank_load": np.zeros(m.ep, np.int64), "copies": s["copies"]})
            if s["load"] is not None:
                got["load"] += s["load"]
            got["dropped"] += s["dropped"]
            got["rank_load"][s["rank"]] += s["computed"]
    return dict(sorted(merged.items()))


def arrays(merged, before):
    """The /moe datasets ({name: (array, description)}) of this run's gathered counts plus
    those of earlier runs (before: results.ResultsFile.arrays)."""
    load = np.array([s["load"] for s in merged.values()])  # (L, E)
    rank_load = np.array([s["rank_load"] for s in merged.values()])  # (L, ep)
    dropped = np.array([s["dropped"] for s in merged.values()], np.int64)
    layers = np.array(list(merged), np.int64)
    old = {name: a for name, (a, _) in before.items()}
    if np.array_equal(old.get("moe/layers"), layers):
        load = load + old["moe/expert_load"]
        dropped = dropped + old["moe/dropped"]
        if old["moe/rank_load"].shape == rank_load.shape:  # same ep as before
            rank_load = rank_load + old["moe/rank_load"]
    values = {"moe/layers": layers, "moe/expert_load": load, "moe/imbalance": _imbalance(load),
              "moe/rank_load": rank_load, "moe/rank_imbalance": _imbalance(rank_load), "moe/dropped": dropped,
              "moe/copies": np.array([s["copies"] for s in merged.values()], np.int64)}
    return {name: (value, DESCRIPTIONS[name]) for name, value in values.items()}


def _imbalance(counts):
    mean = counts.mean(axis=1)
    return np.where(mean > 0, counts.max(axis=1) / np.maximum(mean, 1e-30), 1.0)


def metrics(moe_arrays):
    """A few root-attribute metrics from the /moe datasets."""
    a = {name: value for name, (value, _) in moe_arrays.items()}
    return {"moe.imbalance_max": float(a["moe/imbalance"].max()),
            "moe.rank_imbalance_max": float(a["moe/rank_imbalance"].max()),
            "moe.dropped": int(a["moe/dropped"].sum())}


def load_from_file(path, cfg):
    """{layer: (E,) load} from /moe/expert_load of an earlier results file (rank 0, at start)."""
    with open_results(path) as f:
        if "moe/expert_load" not in f:
            raise UserError(f"moe.load_from: {path} holds no /moe/expert_load (not a run of an MoE model)")
        layers, load = f["moe/layers"][()], f["moe/expert_load"][()]
    want = [i for i, moe in enumerate(cfg.moe_layers) if moe]
    if layers.tolist() != want or load.shape[1] != cfg.num_experts:
        raise UserError(f"moe.load_from: {path} counts layers {layers.tolist()} x {load.shape[1]} experts; "
                        f"this model has MoE layers {want} x {cfg.num_experts} experts")
    return {str(layer): row.tolist() for layer, row in zip(layers, load)}


def routing_sample(requests):
    """The prompts of the routing pass, as dispatch messages: the first ROUTING_PROMPTS valid
    ones, each generating one token."""
    sample = [r for r in requests if r.error is None][:ROUTING_PROMPTS]
    return [dispatch.encode_request(dataclasses.replace(r, sampling=dataclasses.replace(r.sampling, max_new_tokens=1)))
            for r in sample]


def replicate(model, load, hot):
    """Place `hot` extra copies per MoE layer from load ({"layer": (E,) counts}, the same on
    every rank) and start counting afresh."""
    for layer, moe in model.moe_layers().items():
        moe.replicate(np.asarray(load[str(layer)]), hot)
        moe.load[:], moe.computed[:], moe.dropped = 0, 0, 0


def check(job, cfg):
    """UserError for [moe] settings that do not fit the model or the layout."""
    m = job.moe
    if (m.capacity_factor or m.hot_experts or m.load_from) and not cfg.num_experts:
        raise UserError(f"{job.path}: [moe] settings given, but the model has no experts")
    if m.hot_experts and job.parallel.ep == 1:
        raise UserError(f"{job.path}: moe.hot_experts = {m.hot_experts} needs parallel.ep > 1 "
                        "(copies go to other EP ranks)")
    if m.hot_experts > cfg.num_experts:
        raise UserError(f"{job.path}: moe.hot_experts = {m.hot_experts} is more than the model's "
                        f"{cfg.num_experts} experts")

