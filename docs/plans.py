"""Writes docs/plans.md: the planner's best layouts for the preset models on 1 to 64 nodes of
8 H100 (NVLink inside, InfiniBand NDR between), and where each way of splitting one replica
stops scaling (communication per layer above compute per layer).

    .venv/bin/python docs/plans.py > docs/plans.md
"""

from mpinfer import planner
from mpinfer.costmodel import Layout, Workload, estimate, stage_step
from mpinfer.errors import UserError
from mpinfer.presets import MODELS

NODES = (1, 2, 4, 8, 16, 32, 64)
WORK = Workload()


def best(cfg, nodes, objective):
    try:
        return planner.rank(cfg, WORK, planner.cluster(nodes, 8), objective)[0]
    except UserError:
        return None


def plans(name, cfg):
    yield f"### {name}\n"
    yield "| nodes | best for throughput | tok/s | best for latency | request | first token | per token |"
    yield "|---|---|---|---|---|---|---|"
    for nodes in NODES:
        t, lat = best(cfg, nodes, "throughput"), best(cfg, nodes, "latency")
        if t is None:
            yield f"| {nodes} | does not fit | | | | | |"
            continue
        yield (f"| {nodes} | {t.layout} | {t.throughput:,.0f} | {lat.layout} | {planner.seconds(lat.request_s)} | "
               f"{planner.seconds(lat.ttft_s)} | {planner.seconds(lat.tpot_s)} |")
    yield ""


def ratio(cfg, cluster, layout, prefill):
    """Communication / compute (the roofline's compute or memory time) per layer of one step of
    the slowest stage: a decode step of the batch, or a prefill chunk of 8192 tokens."""
    b, S, G = WORK.batch, WORK.prompt_len, WORK.gen_len
    M = layout.micro_batches
    step = (stage_step(cfg, WORK, cluster, layout, 8192, 8192 / S, S / 2, True) if prefill else
            stage_step(cfg, WORK, cluster, layout, b / M, b / M, S + G / 2, False))
    gpu = step["compute"] + step["memory"]
    return (step["tp"] + step["pp"] + step["ep"] + step["cp"]) / gpu


def scaling(name, cfg):
    """One replica split further and further along one dimension: where comm/compute passes 1."""
    families = {"tp T": [Layout(tp=t) for t in (1, 2, 4, 8, 16)],
                "tp 8 x pp P": [Layout(tp=8, pp=p, micro_batches=p) for p in (1, 2, 4, 8, 16, 32, 64)
                                if p <= cfg.num_layers],
                "tp 8 x cp C": [Layout(tp=8, cp=c) for c in (1, 2, 4, 8)]}
    if cfg.num_experts:
        families["dp D x tp 8, ep 8D"] = [Layout(dp=d, tp=8, ep=8 * d) for d in (1, 2, 4, 8, 16, 32)
                                          if cfg.num_experts % (8 * d) == 0]
    yield f"### {name}\n"
    yield "| split | degree: comm / compute per layer, decode (prefill) | stops scaling at |"
    yield "|---|---|---|"
    for family, layouts in families.items():
        cells, stop = [], "-"
        for lay in layouts:
            gpus = lay.dp * lay.tp * lay.pp * lay.cp
            cluster = planner.cluster(max(1, gpus // 8), min(gpus, 8))
            if not estimate(cfg, Workload(batch=WORK.batch), cluster, lay).fits:
                cells.append(f"{_degree(family, lay)}: no fit")
                continue
            dec, pre = ratio(cfg, cluster, lay, False), ratio(cfg, cluster, lay, True)
            cells.append(f"{_degree(family, lay)}: {dec:.2f} ({pre:.2f})")
            if stop == "-" and max(dec, pre) > 1:
                stop = _degree(family, lay)
        yield f"| {family} | {', '.join(cells)} | {stop} |"
    yield ""


def _degree(family, lay):
    return {"tp T": lay.tp, "tp 8 x pp P": lay.pp, "tp 8 x cp C": lay.cp}.get(family, lay.ep)


def seventy_b():
    """The chapter's example, 70B on 2 x 8 H100, layout by layout: the latency plan is TP 8 inside
    each node and PP 2 across, the throughput plan is smaller replicas; compared here at equal
    sequences in flight over the whole cluster as well, so replicas do not win by batch alone."""
    cfg, cluster = MODELS["llama3-70b"], planner.cluster(2, 8)
    layouts = [Layout(tp=8, pp=2, micro_batches=2), Layout(dp=2, tp=8), Layout(dp=2, tp=4, pp=2, micro_batches=2),
               Layout(dp=4, tp=4), Layout(dp=8, tp=2)]
    yield f"| layout | request, {WORK.batch} per replica | tok/s, {WORK.batch} per replica | " + " | ".join(
        f"tok/s, {n} in all" for n in (128, 512, 2048)) + " | TP all-reduces' share (128 per replica) |"
    yield "|---|---|---|---|---|---|---|"
    for lay in layouts:
        one = estimate(cfg, WORK, cluster, lay)
        cells = [planner.seconds(one.request_s) if one.fits else "no fit"]
        for per_replica in (WORK.batch, *(n // lay.dp for n in (128, 512, 2048))):
            e = estimate(cfg, Workload(batch=per_replica), cluster, lay)
            cells.append(f"{e.throughput:,.0f}" if e.fits else "no fit")
        yield f"| {lay} | " + " | ".join(cells) + (f" | {one.parts['tp'] / one.request_s:.0%} |" if one.fits else " | |")
    yield ""


def main():
    print("# Layout plans\n\nThe planner's best layouts for the preset models on 1 to 64 nodes of 8 H100 (NVLink inside "
          "a node, InfiniBand NDR between nodes), and where each way of splitting one replica stops scaling.\n")
    print(f"Workload: {WORK.batch} sequences in flight per replica, prompts of {WORK.prompt_len} tokens, "
          f"{WORK.gen_len} generated, 16-bit weights and KV cache; generated by `docs/plans.py` from the cost "
          "model of `mpinfer/costmodel.py` (`mpinfer plan` prints the same for any model and cluster).\n")
    print("## Best layouts by cluster size\n")
    for name, cfg in MODELS.items():
        print("\n".join(plans(name, cfg)))
    print("## 70B on 2 nodes of 8 H100: one replica over both nodes, or several\n")
    print("The chapter puts 70B on 2 x 8 H100 as TP 8 inside each node and PP 2 across the nodes, and so does the "
          "planner for latency: a request of a full batch finishes soonest that way. For throughput it picks smaller replicas: "
          "TP 8 spends about a quarter of its time in all-reduces (a layer's all-reduce moves the same bytes "
          "whatever T, while T = 8 leaves each GPU half the arithmetic of T = 4), and the engine does not overlap "
          "them with compute. Comparing at equal sequences in flight over the cluster, so that replicas do not "
          "win by keeping more of them, TP 8 replicas lead only at the smallest load.\n")
    print("\n".join(seventy_b()))
    print("## Where splitting one replica stops scaling\n")
    print("Communication per layer over compute per layer (the larger of arithmetic and memory traffic) for one "
          "replica split by one dimension more and more, in a decode step of the batch and (in brackets) a "
          "prefill chunk of 8192 tokens; it stops scaling where communication passes compute. TP 16 spans two "
          "nodes (the planner never offers it); the EP row spreads the experts over replicas of tp 8, one "
          "per node.\n")
    for name, cfg in MODELS.items():
        print("\n".join(scaling(name, cfg)))


if __name__ == "__main__":
    main()
