"""Mapping: literal group tables for several layouts, consistency of every rank's groups and
Split colours over many layouts, pipeline stage ranges, and the refusals. No MPI."""

import re

import pytest

from mpinfer.mapping import KINDS, Mapping, stage_layers


def groups(world, kind, **layout):
    """The distinct groups of one kind over all ranks, sorted."""
    return sorted({tuple(Mapping(world, r, **layout).group(kind)) for r in range(world)})


def indices(world, names, **layout):
    """{rank: tuple of the named attributes}."""
    return {r: tuple(getattr(Mapping(world, r, **layout), n) for n in names) for r in range(world)}


def test_dp2_pp2_tp2():
    layout = dict(tp=2, pp=2, ranks_per_node=4)
    assert indices(8, ("node", "dp_rank", "pp_rank", "tp_rank"), **layout) == {
        0: (0, 0, 0, 0), 1: (0, 0, 0, 1), 2: (0, 0, 1, 0), 3: (0, 0, 1, 1),
        4: (1, 1, 0, 0), 5: (1, 1, 0, 1), 6: (1, 1, 1, 0), 7: (1, 1, 1, 1)}
    assert groups(8, "tp", **layout) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert groups(8, "pp", **layout) == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert groups(8, "dp", **layout) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert groups(8, "cp", **layout) == groups(8, "ep", **layout) == [(r,) for r in range(8)]
    m = Mapping(8, 5, **layout)
    assert (m.dp, m.tp_group, m.pp_group, m.dp_group) == (2, [4, 5], [5, 7], [1, 5])


def test_tp4_pp2():
    assert groups(8, "tp", tp=4, pp=2) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert groups(8, "pp", tp=4, pp=2) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert groups(8, "dp", tp=4, pp=2) == [(r,) for r in range(8)]


def test_tp3_pp2():
    assert groups(6, "tp", tp=3, pp=2) == [(0, 1, 2), (3, 4, 5)]
    assert groups(6, "pp", tp=3, pp=2) == [(0, 3), (1, 4), (2, 5)]
    assert indices(6, ("pp_rank", "tp_rank"), tp=3, pp=2) == {
        0: (0, 0), 1: (0, 1), 2: (0, 2), 3: (1, 0), 4: (1, 1), 5: (1, 2)}


def test_cp2_tp2():
    assert groups(4, "tp", tp=2, cp=2) == [(0, 1), (2, 3)]
    assert groups(4, "cp", tp=2, cp=2) == [(0, 2), (1, 3)]
    assert indices(4, ("cp_rank", "tp_rank"), tp=2, cp=2) == {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}


def test_ep_inside_a_replica():
    # tp 4, ep 2: each TP group cut into blocks of 2; the block picks the slice of every expert
    assert groups(8, "ep", tp=4, ep=2) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert indices(4, ("ep_rank", "moe_tp", "moe_tp_rank"), tp=4, ep=2) == {
        0: (0, 2, 0), 1: (1, 2, 0), 2: (0, 2, 1), 3: (1, 2, 1)}


def test_ep_across_replicas():
    # tp 2, dp 4, ep 4: replicas {0, 1} and {2, 3} each form one EP group of 4 ranks
    assert groups(8, "ep", tp=2, ep=4) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert indices(8, ("dp_rank", "ep_rank", "moe_tp"), tp=2, ep=4) == {
        0: (0, 0, 1), 1: (0, 1, 1), 2: (1, 2, 1), 3: (1, 3, 1),
        4: (2, 0, 1), 5: (2, 1, 1), 6: (3, 2, 1), 7: (3, 3, 1)}
    # with pp 2 the EP group stays at one pipeline stage: ranks of stage 0 of replicas 0 and 1
    assert groups(8, "ep", tp=1, pp=2, ep=2) == [(0, 2), (1, 3), (4, 6), (5, 7)]


def valid_layouts(max_world=12):
    for world in range(1, max_world + 1):
        for tp in range(1, world + 1):
            for pp in range(1, world // tp + 1):
                for cp in range(1, world // (tp * pp) + 1):
                    if world % (tp * pp * cp):
                        continue
                    dp = world // (tp * pp * cp)
                    for ep in range(1, dp * tp + 1):
                        if tp % ep == 0 or (ep % tp == 0 and dp * tp % ep == 0):
                            yield world, dict(tp=tp, pp=pp, cp=cp, ep=ep)


def test_groups_partition_the_world_and_colours_give_them():
    for world, layout in valid_layouts():
        maps = [Mapping(world, r, **layout) for r in range(world)]
        for m in maps:  # the rank formula of the docstring
            assert m.rank == ((m.dp_rank * m.pp + m.pp_rank) * m.cp + m.cp_rank) * m.tp + m.tp_rank
        for kind in KINDS:
            size = m.dp if kind == "dp" else layout[kind]
            for m in maps:
                where = f"world {world} {layout} rank {m.rank} {kind}"
                group = m.group(kind)
                assert len(group) == size and group == sorted(group), where
                colour, key = m.colour(kind)
                assert group[key] == m.rank and getattr(m, kind + "_rank") == key, where
                assert [r for r in range(world) if maps[r].colour(kind)[0] == colour] == group, where
                assert all(maps[r].group(kind) == group for r in group), where  # every member agrees
                assert [maps[r].colour(kind)[1] for r in group] == list(range(size)), where


# 30 layers (SmolLM2), cost units = 30 + embedding + head = 32:
#   pp 1: [0, 30)                                         30
#   pp 2: [0, 15) [15, 30)                                15 15   (16 units each)
#   pp 3: [0, 10) [10, 20) [20, 30)                       10 10 10 (11 10 11 units)
#   pp 4: [0, 7)  [7, 15)  [15, 23) [23, 30)              7 8 8 7 (8 units each)
def test_stage_layers_30():
    assert stage_layers(30, 1) == [(0, 30)]
    assert stage_layers(30, 2) == [(0, 15), (15, 30)]
    assert stage_layers(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert stage_layers(30, 4) == [(0, 7), (7, 15), (15, 23), (23, 30)]
    assert [Mapping(8, r, tp=2, pp=4).layer_range(30) for r in (0, 2, 4, 6)] == stage_layers(30, 4)


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4, 7, 30, 31, 64])
@pytest.mark.parametrize("pp", [1, 2, 3, 4, 5, 8])
def test_stage_layers_contiguous_and_balanced(num_layers, pp):
    if pp > num_layers + 2:
        with pytest.raises(ValueError, match=f"pp={pp} is more stages than the {num_layers} layers"):
            stage_layers(num_layers, pp)
        return
    stages = stage_layers(num_layers, pp)
    assert stages[0][0] == 0 and stages[-1][1] == num_layers
    assert all(a[1] == b[0] for a, b in zip(stages, stages[1:]))
    cost = [stop - first for first, stop in stages]
    cost[0] += 1
    cost[-1] += 1
    assert max(cost) - min(cost) <= 1


def test_few_layers_leave_the_head_alone():
    assert stage_layers(3, 4) == [(0, 1), (1, 2), (2, 3), (3, 3)]
    assert stage_layers(3, 3) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("args,kwargs,message", [
    ((8, 0), dict(tp=0), "tp=0 must be a whole number, at least 1"),
    ((0, 0), {}, "world=0 must be a whole number, at least 1"),
    ((8, 8), {}, "rank=8 is outside the world of 8 ranks"),
    ((8, 0), dict(tp=3), "tp*pp*cp = 3*1*1 = 3 does not divide the world of 8 ranks"),
    ((8, 0), dict(pp=4, cp=4), "tp*pp*cp = 1*4*4 = 16 does not divide the world of 8 ranks"),
    ((8, 0), dict(tp=4, ep=3), "ep=3 must divide tp=4 (EP inside a replica) or be a multiple of tp that "
                               "divides dp*tp = 8 (EP across replicas)"),
    ((8, 0), dict(tp=2, ep=16), "ep=16 must divide tp=2 (EP inside a replica) or be a multiple of tp that "
                                "divides dp*tp = 8 (EP across replicas)"),
    ((8, 0), dict(tp=2, ep=6), "ep=6 must divide tp=2"),
    ((8, 0), dict(ranks_per_node=3), "ranks_per_node=3 does not divide the world of 8 ranks"),
    ((8, 0), dict(tp=4, ranks_per_node=2), "tp=4 does not divide the 2 ranks of a node: a TP group would cross nodes"),
    ((6, 0), dict(tp=3, ranks_per_node=2), "tp=3 does not divide the 2 ranks of a node"),
])
def test_invalid_layouts(args, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Mapping(*args, **kwargs)


def test_table():
    assert Mapping(8, 3, tp=2, pp=2, ranks_per_node=4).table(num_layers=30) == "\n".join([
        "world 8 = dp 2 x pp 2 x tp 2, 2 nodes of 4 ranks",
        "rank node  dp  pp  tp  layers",
        "   0    0   0   0   0  0-14",
        "   1    0   0   0   1  0-14",
        "   2    0   0   1   0  15-29",
        "   3    0   0   1   1  15-29",
        "   4    1   1   0   0  0-14",
        "   5    1   1   0   1  0-14",
        "   6    1   1   1   0  15-29",
        "   7    1   1   1   1  15-29"])
    assert Mapping(8, 0, tp=2, cp=2, ep=4).table().splitlines()[:3] == [
        "world 8 = dp 2 x pp 1 x cp 2 x tp 2, ep 4 (across 2 replicas), 1 node of 8 ranks",
        "rank node  dp  pp  cp  tp  ep",
        "   0    0   0   0   0   0   0"]
