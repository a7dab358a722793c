"""The cost model of DESIGN.md section 4: what one layout of a model costs on a cluster for a
workload. planner.py ranks layouts with it.

Legend: d hidden size, L layers, V vocabulary, T ranks of a group, b sequences a replica
keeps in flight, S prompt tokens, G generated tokens, B bytes per value (16-bit: 2).

What one GPU of a layout (dp, tp, pp, ep, cp, micro-batches M) costs, per engine step of a
pipeline stage (the slowest stage sets the pace):
- memory: its stage's weights, non-expert ones / tp, experts / max(tp, ep) (ep ranks share
  the experts, each split tp/ep ways when ep divides tp); the KV cache of b sequences of
  S + G tokens (KV heads / tp, at least one; sequence / cp); activations of one prefill chunk.
  A layout fits when all of it fits in USABLE_MEMORY of the GPU.
- compute: 2 x active parameters x tokens + attention (4 x keys x heads*head_dim per token
  and layer), over peak x COMPUTE_EFFICIENCY; memory traffic: weights (the experts a step
  touches) + the KV cache read by decode, over bandwidth x MEMORY_EFFICIENCY. A step takes
  the larger of the two (roofline); communication adds to it (not overlapped).
- TP: 2 ring all-reduces per layer (+1 for the vocab-parallel embedding) of tokens x d x B:
  2(T-1) steps of latency + 2(T-1)/T x bytes / bus bandwidth, steps that cross nodes on the
  network (NCCL's ring model). PP: tokens x d x B to the next stage. EP across replicas:
  per MoE layer a counts exchange, dispatch and combine, each (T-1) latencies, the last two
  moving (T-1)/T of the routed rows x the routing skew (the busiest rank's load / mean).
  CP: prefill passes the KV shares round the ring, C-1 hops per layer; decode merges the C
  partial outputs per layer.
- Prefill of a replica's b x S tokens flows through the pipeline in m = max(M, chunks)
  micro-batches: (m + P - 1) stage steps, the P - 1 being the bubble (P-1)/(m+P-1). Decode:
  every sequence advances a token per round of max(M, P) stage steps (idle stages when
  M < P: the bubble (P-1)/P of DESIGN.md without micro-batching).
Throughput = dp x b x G / (prefill + G x round) generated tokens/s; latency of a request =
prefill + G x round (time to first token + G per-token times).
"""

import dataclasses
import math

from .mapping import stage_layers
from .presets import GB, GPU, Link

# Fractions of peak a serving engine reaches: large GEMMs run at 60-70% of tensor peak,
# streaming weights and KV at 80-90% of HBM bandwidth; 10% of device memory goes to the
# runtime, NCCL buffers and fragmentation (vLLM's default gpu_memory_utilization is 0.9).
COMPUTE_EFFICIENCY = 0.6
MEMORY_EFFICIENCY = 0.8
USABLE_MEMORY = 0.9
SPANNING_STEP = 1.8
PREFILL_CHUNK = 8192  # tokens of prompt per micro-batch step: bounds activation memory


@dataclasses.dataclass(frozen=True)
class Workload:
    batch: int = 128  # sequences each replica keeps in flight (engine.max_seqs)
    prompt_len: int = 1024
    gen_len: int = 256
    param_bytes: float = 2  # 16-bit weights
    act_bytes: float = 2  # 16-bit activations and KV cache
    routing_skew: float = 1.3  # MoE: tokens at the busiest EP rank / the mean


@dataclasses.dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: GPU
    intra: Link
    inter: Link

    @property
    def world(self):
        return self.nodes * self.gpus_per_node


@dataclasses.dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    micro_batches: int = 1

    def __str__(self):
        parts = [f"{k} {getattr(self, k)}" for k in ("dp", "pp", "cp", "tp") if getattr(self, k) > 1 or k == "tp"]
        return " x ".join(parts) + (f", ep {self.ep}" if self.ep > 1 else "")


@dataclasses.dataclass
class Estimate:
    """One layout's predicted figures. memory: bytes per GPU (weights, kv, activations, total,
    usable); parts: seconds of one request's time by cost (compute, memory, tp, pp, ep, cp,
    bubble), summing to request_s."""

    layout: Layout
    fits: bool
    memory: dict
    ttft_s: float
    tpot_s: float
    request_s: float
    throughput: float  # generated tokens/s of the whole cluster
    parts: dict

    @property
    def dominant(self):
        return max(self.parts, key=self.parts.get)

    def to_json(self):
        return {**dataclasses.asdict(self.layout), "fits": self.fits, "memory_gb": {k: v / GB for k, v in self.memory.items()},
                "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "request_s": self.request_s,
                "throughput_tok_s": self.throughput, "dominant": self.dominant, "parts_s": self.parts}


# ----- communication: latency + bytes / bandwidth per op ------------------------------------

def all_reduce_time(cluster, nbytes, ranks, nodes=1, calls=1):
    """Seconds of `calls` ring all-reduces over `ranks` ranks on `nodes` nodes moving nbytes of
    payload in all: 2(T-1) steps each (2(nodes-1) of them over the network) and
    2(T-1)/T x nbytes through the slowest link. Across nodes T/nodes rings run side by side,
    one per GPU's NIC (NCCL's channels), so the network carries T/nodes x its bandwidth, and
    the steps inside a node take SPANNING_STEP times longer (NCCL's tuning model, tuning.cc:
    intraLat *= 1.8 when a ring spans nodes)."""
    if ranks == 1:
        return 0.0
    steps, far = 2 * (ranks - 1), 2 * (nodes - 1)
    near = cluster.intra.step_latency * (SPANNING_STEP if nodes > 1 else 1.0)
    latency = (steps - far) * near + far * cluster.inter.step_latency
    bandwidth = cluster.intra.bus_bandwidth
    if nodes > 1:
        bandwidth = min(bandwidth, cluster.inter.bus_bandwidth * ranks / nodes)
    return calls * latency + 2 * (ranks - 1) / ranks * nbytes / bandwidth


def p2p_time(link, nbytes, calls=1):
    """Seconds of `calls` point-to-point messages moving nbytes in all over one link."""
    return calls * link.latency + nbytes / link.bandwidth


def all_to_all_time(cluster, nbytes, ranks, nodes, calls=1, moving=1):
    """Seconds of `calls` personalised all-to-alls over `ranks` ranks on `nodes` nodes, nbytes
    of rows leaving each rank in all: (T-1) latencies each (pairwise exchange), the rows for
    the rank's own node over the intra-node link and the rest over its NIC at once. `moving`
    of the calls carry rows (a counts exchange is latency only)."""
    if ranks == 1:
        return 0.0
    far_share = (ranks - ranks // nodes) / (ranks - 1)  # of my peers, those on other nodes
    link = cluster.inter if nodes > 1 else cluster.intra
    move = max(nbytes * (1 - far_share) / cluster.intra.bandwidth, nbytes * far_share / cluster.inter.bandwidth)
    return calls * (ranks - 1) * link.step_latency + moving * move


# ----- the model's numbers -------------------------------------------------------------------

def _params(cfg):
    """Parameter counts: per layer attention, dense MLP, one expert, shared expert + router;
    embedding and head."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    d = cfg.hidden_size
    return dict(attn=2 * d * q + 2 * d * kv, mlp=3 * d * cfg.intermediate_size, expert=3 * d * cfg.expert_size,
                shared=3 * d * cfg.shared_expert_size + d * cfg.num_experts, embed=cfg.vocab_size * d)


def total_params(cfg):
    """(all parameters, parameters one token uses)."""
    p, moe = _params(cfg), sum(cfg.moe_layers) if cfg.num_experts else 0
    dense = cfg.num_layers * p["attn"] + (cfg.num_layers - moe) * p["mlp"] + moe * p["shared"]
    dense += p["embed"] * (1 if cfg.tie_embeddings else 2)
    return dense + moe * cfg.num_experts * p["expert"], dense + moe * cfg.experts_per_token * p["expert"]


def _stage(cfg, layout, s):
    """(layers, MoE layers, first?, last?) of pipeline stage s."""
    first, stop = stage_layers(cfg.num_layers, layout.pp)[s]
    moe = sum(cfg.moe_layers[first:stop]) if cfg.num_experts else 0
    return stop - first, moe, s == 0, s == layout.pp - 1


def _kv_bytes(cfg, work, layout):
    """KV-cache bytes one token takes in one layer on one GPU: K and V of the rank's KV heads
    (at least one: replicated when tp exceeds them). Under CP a rank holds 1/cp of the tokens."""
    return 2 * cfg.head_dim * max(1, cfg.num_kv_heads // layout.tp) * work.act_bytes


def _weights(cfg, work, layout, stage):
    """Bytes of weights one GPU of the stage holds: (non-expert, expert)."""
    p, (n, moe, first, last) = _params(cfg), stage
    shard = n * p["attn"] + (n - moe) * p["mlp"] + moe * p["shared"] + first * p["embed"]
    shard += last * p["embed"] * (not cfg.tie_embeddings or layout.pp > 1)  # a tied head is the embedding
    expert = moe * cfg.num_experts * p["expert"] / max(layout.tp, layout.ep)
    return shard / layout.tp * work.param_bytes, expert * work.param_bytes


def _activations(cfg, work, layout):
    """Bytes of one prefill chunk's working set: residual and norm (2d), QKV, and the
    MLP's gate, up and product (3 x the widest MLP a token meets), per token."""
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    mlp = max(cfg.intermediate_size, cfg.experts_per_token * cfg.expert_size + cfg.shared_expert_size)
    return PREFILL_CHUNK * (2 * d + (q + 2 * kv + 3 * mlp) / layout.tp) * work.act_bytes


# ----- spans of the groups over nodes --------------------------------------------------------

def _nodes(cluster, first_ranks):
    return len({r // cluster.gpus_per_node for r in first_ranks})


def _spans(cluster, layout):
    """Nodes each group spans (tp, cp, ep) and whether each pipeline boundary crosses nodes,
    from the rank order of mapping.py (tp fastest, then cp, pp, dp)."""
    tp, cp, pp = layout.tp, layout.cp, layout.pp
    size = tp * cp * pp  # ranks of a replica
    r = layout.ep // tp if layout.ep % tp == 0 and layout.ep > tp else 1  # replicas of an EP group
    tp_nodes = _nodes(cluster, range(0, tp, min(tp, cluster.gpus_per_node)))
    return dict(tp=tp_nodes, cp=_nodes(cluster, range(0, tp * cp, tp)),
                ep=_nodes(cluster, range(0, r * size, size)) if r > 1 else tp_nodes,
                pp=[any(_nodes(cluster, (k * size + s * tp * cp, k * size + (s + 1) * tp * cp)) > 1
                        for k in range(layout.dp)) for s in range(pp - 1)])


# ----- one step of one stage -----------------------------------------------------------------

def _step(cfg, work, cluster, layout, stage, s, tokens, seqs, keys, prefill, spans):
    """Seconds of one engine step of stage s on one GPU, by cost. tokens: the replica's tokens
    in the step; seqs: its sequences; keys: keys each query sees (prefill: S/2 on average)."""
    n, moe, first, last = stage
    d, g = cfg.hidden_size, cluster.gpu
    tp, ep, cp, B = layout.tp, layout.ep, layout.cp, work.act_bytes
    mine = tokens / cp if prefill else tokens  # prefill splits the prompt over cp; decode does not
    p = _params(cfg)
    skew = work.routing_skew if ep > 1 else 1.0
    active = n * p["attn"] + (n - moe) * p["mlp"] + moe * (p["shared"] + cfg.experts_per_token * p["expert"] * skew)
    seen = keys if prefill else keys / cp  # decode: each rank attends to its 1/cp of the keys
    flops = 2 * mine * active / tp + 4 * mine * seen * n * cfg.num_heads * cfg.head_dim / tp
    flops += last * 2 * seqs * d * cfg.vocab_size / tp  # the LM head, for each sequence's last token
    shard, experts = _weights(cfg, work, layout, stage)
    across = ep > tp  # EP over replicas: each rank's experts see the tokens of ep/tp replicas
    routed = mine * (ep // tp if across else 1)
    touched = 1 - (1 - cfg.experts_per_token / cfg.num_experts) ** routed if cfg.num_experts else 0.0
    kv = _kv_bytes(cfg, work, layout) * n * (mine if prefill else seqs * seen)  # write mine, or read all
    traffic = shard + experts * touched + kv
    arithmetic, streaming = flops / (g.flops * COMPUTE_EFFICIENCY), traffic / (g.bandwidth * MEMORY_EFFICIENCY)
    out = dict(compute=0.0, memory=0.0, tp=0.0, pp=0.0, ep=0.0, cp=0.0)
    out["compute" if arithmetic >= streaming else "memory"] = max(arithmetic, streaming)  # roofline
    calls = 2 * n + first
    out["tp"] = all_reduce_time(cluster, calls * mine * d * B, tp, spans["tp"], calls)
    if across and moe:
        rows = mine / tp * cfg.experts_per_token * d * B * (ep - 1) / ep * skew
        out["ep"] = all_to_all_time(cluster, 2 * moe * rows, ep, spans["ep"], 3 * moe, moving=1)
    if cp > 1:
        link = cluster.inter if spans["cp"] > 1 else cluster.intra
        if prefill:  # ring attention: my K/V share goes C-1 hops per layer
            out["cp"] = p2p_time(link, n * (cp - 1) * mine * _kv_bytes(cfg, work, layout), n * (cp - 1))
        else:  # split-KV decode: the C partial outputs of every layer merge
            out["cp"] = all_reduce_time(cluster, n * seqs * cfg.num_heads * cfg.head_dim / tp * B, cp, spans["cp"], n)
    if s < layout.pp - 1:
        out["pp"] = p2p_time(cluster.inter if spans["pp"][s] else cluster.intra, mine * d * B)
    return out


def stage_step(cfg, work, cluster, layout, tokens, seqs, keys, prefill):
    """Seconds of one engine step on the slowest pipeline stage, by cost (see _step)."""
    spans = _spans(cluster, layout)
    steps = [_step(cfg, work, cluster, layout, _stage(cfg, layout, s), s, tokens, seqs, keys, prefill, spans)
             for s in range(layout.pp)]
    return max(steps, key=lambda c: sum(c.values()))


# ----- one layout --------------------------------------------------------------------------

def memory(cfg, work, layout, seqs):
    """Bytes per GPU on the stage that holds the most: weights, the KV cache of seqs sequences
    of prompt + generated tokens, activations, total."""
    stages = [_stage(cfg, layout, s) for s in range(layout.pp)]
    weights = max(sum(_weights(cfg, work, layout, st)) for st in stages)
    tokens = seqs * (work.prompt_len + work.gen_len) / layout.cp
    kv = max(st[0] for st in stages) * _kv_bytes(cfg, work, layout) * tokens
    act = _activations(cfg, work, layout)
    return dict(weights=weights, kv=kv, activations=act, total=weights + kv + act)


def estimate(cfg, work, cluster, layout):
    """The figures of one layout (see the module docstring). Does not check that the layout
    is valid: layouts() does."""
    b = work.batch
    mem = memory(cfg, work, layout, b)
    mem["usable"] = USABLE_MEMORY * cluster.gpu.memory
    S, G, P = work.prompt_len, work.gen_len, layout.pp
    M = min(layout.micro_batches, b)
    m = max(M, math.ceil(b * S / PREFILL_CHUNK))  # prefill micro-batches
    pre = stage_step(cfg, work, cluster, layout, b * S / m, b / m, S / 2, True)
    dec = stage_step(cfg, work, cluster, layout, b / M, b / M, S + G / 2, False)
    t_pre, t_dec = sum(pre.values()), sum(dec.values())
    ttft, tpot = (m + P - 1) * t_pre, max(M, P) * t_dec
    parts = {k: m * pre[k] + G * M * dec[k] for k in pre}
    parts["bubble"] = (P - 1) * t_pre + G * (max(M, P) - M) * t_dec
    request = ttft + G * tpot
    return Estimate(layout, mem["total"] <= mem["usable"], mem, ttft, tpot, request, layout.dp * b * G / request, parts)
