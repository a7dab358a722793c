"""GPU check of the MoE routing and sampling kernels (kernels_cuda/moe_routing.cu, sampling.cu)
against their references: NumpyBackend.route (what MoE.route calls), the per-pair sum of
MoE.__call__ (mpinfer/moe.py), np.argsort(kind="stable") / np.bincount, np.argmax and
engine.sampling.sample. Ids must match exactly ("mismatches"); float outputs by rel_err.
Timed next to torch: route + permute vs softmax + topk + stable sort + bincount, argmax vs
torch.argmax, gather vs index_select, combine vs index_add_.
"""

import traceback

import numpy as np
from util import copy_bandwidth, poisoned, rel_err, result, time_us

from mpinfer.backend import cuda_routing, cuda_sampling
from mpinfer.backend.numpy_backend import NumpyBackend
from mpinfer.engine import sampling
from mpinfer.params import SamplingParams


def _row(kernel, shape, mismatches, **extra):
    return {"kernel": kernel, "shape": shape, "mismatches": int(mismatches), "ok": bool(mismatches == 0), **extra}


def _failed(kernel, shape):
    return {"kernel": kernel, "shape": shape, "ok": False, "error": traceback.format_exc(limit=3).strip()}


def _timing(us, baseline, baseline_us, nbytes=None):
    t = {"us": us, "baseline": baseline, "baseline_us": baseline_us, "ratio": baseline_us / us}
    if nbytes is not None:
        t["bw_frac"] = nbytes / (us * 1e-6) / copy_bandwidth()
    return t


def _route_logits(rng, T, E, ties):
    if ties:  # a few distinct values per row: equal probabilities, the lower id must win
        return rng.integers(-3, 3, (T, E)).astype(np.float32)
    return (rng.standard_normal((T, E)) * 2).astype(np.float32)


def check_route(rng):
    import cupy
    import torch

    rows = []
    for T, E, top, norm, ties, timed in [(4096, 64, 8, True, False, True), (333, 8, 2, False, True, False),
                                          (1000, 256, 8, True, False, False), (517, 60, 4, True, True, False),
                                          (64, 160, 6, False, False, False), (5, 1, 1, True, False, False)]:
        shape = f"T{T} E{E} top{top} norm{int(norm)}" + (" ties" if ties else "")
        try:
            logits = _route_logits(rng, T, E, ties)
            ref_e, ref_w = NumpyBackend(threads=1).route(logits, top, norm)
            x = cupy.asarray(logits)
            out = (poisoned((T, top), np.int32), poisoned((T, top), np.float32))
            experts, weights = cuda_routing.route(x, top, norm, out=out)
            bad = int((experts.get() != ref_e).sum())
            row = _row("moe_route", shape, bad, rel_err=rel_err(weights.get(), ref_w))
            row["ok"] = row["ok"] and row["rel_err"] < 1e-2
            if timed:
                xt = torch.as_tensor(x, device="cuda")

                def ours():
                    cuda_routing.permute(cuda_routing.route(x, top, norm)[0], E)

                def theirs():
                    w, e = torch.topk(torch.softmax(xt, -1), top, -1)
                    w = w / w.sum(-1, keepdim=True)
                    torch.sort(e.flatten(), stable=True)
                    torch.bincount(e.flatten(), minlength=E)

                row["kernel"] = "moe_route+permute"
                row.update(_timing(time_us(ours), "torch softmax+topk+sort(stable)+bincount", time_us(theirs)))
            rows.append(row)
        except Exception:
            rows.append(_failed("moe_route", shape))
    return rows


def check_permute(rng):
    import cupy
    import torch

    rows = []
    for T, A, E, skew, timed in [(4096, 8, 64, False, True), (8192, 8, 256, True, False), (3, 2, 5, False, False),
                                 (1000, 1, 1000, False, False), (777, 6, 3000, True, False)]:
        shape = f"T{T} A{A} E{E}" + (" skewed" if skew else "")
        try:
            experts = rng.integers(0, E, (T, A)).astype(np.int32)
            if skew:  # a hot expert: long runs of one id inside every warp's share
                experts[rng.random((T, A)) < 0.6] = E // 3
            x = cupy.asarray(experts)
            order, counts = cuda_routing.permute(x, E, out=(poisoned(T * A, np.int32), poisoned(E, np.int32)))
            bad = int((order.get() != np.argsort(experts.ravel(), kind="stable")).sum())
            bad += int((counts.get() != np.bincount(experts.ravel(), minlength=E)).sum())
            row = _row("moe_permute", shape, bad)
            if timed:
                xt = torch.as_tensor(x, device="cuda").flatten().long()

                def theirs():
                    torch.sort(xt, stable=True)
                    torch.bincount(xt, minlength=E)

                row.update(_timing(time_us(lambda: cuda_routing.permute(x, E)), "torch sort(stable)+bincount",
                                   time_us(theirs)))
            rows.append(row)
        except Exception:
            rows.append(_failed("moe_permute", shape))
    return rows


def check_gather_combine(rng):
    import cupy
    import torch

    rows = []
    for T, A, D, keep in [(4096, 8, 1024, 1.0), (4096, 8, 1024, 0.8), (77, 3, 130, 0.5)]:
        shape = f"T{T} A{A} D{D} kept{keep}"
        N = T * A
        try:
            x = rng.standard_normal((T, D)).astype(np.float32)
            experts = rng.integers(0, 16, (T, A))
            order = np.argsort(experts.ravel(), kind="stable")
            order = order[rng.random(N) < keep].astype(np.int32)  # capacity drops keep the order
            n = len(order)
            xd, od = cupy.asarray(x), cupy.asarray(order)
            rows_d = od // A
            g = cuda_routing.gather_rows(xd, rows_d, out=poisoned((n, D)))
            grow = result("moe_gather_rows", shape, g.get(), x[order // A])
            xt, rt = torch.as_tensor(xd, device="cuda"), torch.as_tensor(rows_d, device="cuda").long()
            us = time_us(lambda: cuda_routing.gather_rows(xd, rows_d))
            grow.update(_timing(us, "torch index_select", time_us(lambda: torch.index_select(xt, 0, rt)), 2 * n * D * 4))
            rows.append(grow)

            y = rng.standard_normal((n, D)).astype(np.float32)
            w = rng.random((T, A)).astype(np.float32)
            per_pair = np.zeros((N, D), np.float32)  # MoE.__call__'s sum over each token's pairs
            per_pair[order] = y * w.ravel()[order][:, None]
            ref = per_pair.reshape(T, A, D).sum(axis=1)
            yd, wd = cupy.asarray(y), cupy.asarray(w)
            out = cuda_routing.combine(yd, od, wd, T, out=poisoned((T, D)))
            crow = result("moe_combine", shape, out.get(), ref)
            yt, wt = torch.as_tensor(yd, device="cuda"), torch.as_tensor(wd, device="cuda").flatten()
            ot = torch.as_tensor(od, device="cuda").long()

            def theirs():
                torch.zeros((T, D), device="cuda").index_add_(0, ot // A, yt * wt[ot][:, None])

            us = time_us(lambda: cuda_routing.combine(yd, od, wd, T))
            crow.update(_timing(us, "torch index_add_", time_us(theirs), (n * D + T * D) * 4))
            rows.append(crow)
        except Exception:
            rows.append(_failed("moe_gather_rows/combine", shape))
    return rows


def check_argmax(rng):
    import cupy
    import torch

    rows = []
    for R, V, timed in [(64, 128256, True), (3, 50001, False), (300, 4096, False), (1, 262144, False)]:
        shape = f"R{R} V{V}"
        try:
            logits = rng.standard_normal((R, V)).astype(np.float32)
            logits[::2] = np.round(logits[::2] * 2)  # repeated maxima: the lowest id must win
            logits[0] = 1.5  # a constant row: id 0
            x = cupy.asarray(logits)
            out = cuda_sampling.argmax(x, out=poisoned(R, np.int32))
            row = _row("argmax", shape, int((out.get() != np.argmax(logits, axis=-1)).sum()))
            if timed:
                xt = torch.as_tensor(x, device="cuda")
                row.update(_timing(time_us(lambda: cuda_sampling.argmax(x)), "torch.argmax",
                                   time_us(lambda: torch.argmax(xt, -1)), R * V * 4))
            rows.append(row)
        except Exception:
            rows.append(_failed("argmax", shape))
    return rows


def check_sample(rng):
    import cupy

    R, V = 256, 49152
    shape = f"R{R} V{V}"
    try:
        logits = (rng.standard_normal((R, V)) * 3).astype(np.float32)
        logits[::4] = np.round(logits[::4])  # ties across the top-k cut and inside the candidates
        params = {
            "temperature": rng.choice([0.7, 1.3], R), "top_k": rng.choice([0, 1, 50], R),
            "top_p": rng.choice([0.9, 1.0], R), "min_p": rng.choice([0.0, 0.05, 0.001], R),
            "seed": rng.integers(0, 2**63, R, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, R, dtype=np.uint64),
        }
        params["temperature"][:4] = 0.0  # greedy rows go through the same call
        keys = np.array([sampling.request_key(f"request-{r}") for r in range(R)], np.uint64)
        steps = rng.integers(0, 1 << 33, R).astype(np.int64)
        ref = np.array([
            sampling.sample(logits[r], SamplingParams(**{k: v[r].item() for k, v in params.items()}),
                            int(keys[r]), int(steps[r]))
            for r in range(R)])
        x = cupy.asarray(logits)
        key_list = [int(k) for k in keys]  # Python ints up to 2**64: the list path of the wrapper

        def ours(out=None):
            return cuda_sampling.sample(x, params["temperature"], params["top_k"], params["top_p"],
                                        params["min_p"], params["seed"], key_list, steps, out=out)

        got = ours(out=poisoned(R, np.int32)).get()
        row = _row("sample", shape, int((got != ref).sum()))
        row.update({"us": time_us(ours, warmup=1, repeat=5), "baseline": None})
        return [row]
    except Exception:
        return [_failed("sample", shape)]


def run(rng):
    """All rows of this area: route, permute, gather/combine, argmax, sample."""
    return check_route(rng) + check_permute(rng) + check_gather_combine(rng) + check_argmax(rng) + check_sample(rng)
