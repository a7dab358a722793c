"""Mapping: the parallel layout as plain arithmetic, world rank -> every parallel rank and group.

No MPI here: the same numbers on a laptop and on a cluster, tested with literal tables.
Topology turns a Mapping into MPI sub-communicators using the colours it gives.

Rank order. tp varies fastest, then cp, then pp, then dp:

    rank = ((dp_rank * pp + pp_rank) * cp + cp_rank) * tp + tp_rank,   dp = world // (tp*pp*cp)

so a TP group is tp consecutive ranks and, with launchers that place consecutive ranks on a
node (srun --distribution=block, mpiexec's default), sits inside one node. World 8 =
dp 2 x pp 2 x tp 2 with 4 ranks per node:

    rank node | dp pp tp | tp group  pp group  dp group
       0    0 |  0  0  0 | 0 1       0 2       0 4
       1    0 |  0  0  1 | 0 1       1 3       1 5
       2    0 |  0  1  0 | 2 3       0 2       2 6
       3    0 |  0  1  1 | 2 3       1 3       3 7
       4    1 |  1  0  0 | 4 5       4 6       0 4
       5    1 |  1  0  1 | 4 5       5 7       1 5
       6    1 |  1  1  0 | 6 7       4 6       2 6
       7    1 |  1  1  1 | 6 7       5 7       3 7

A group holds the ranks that differ only in its own index: the pp group is my pipeline in
stage order, the dp group is the rank at my (pp, cp, tp) place in every replica. Every group
lists its ranks in increasing world rank, which is also their order by position.

Expert parallelism (ep = the number of ranks one MoE layer's experts are spread over), two
patterns, chosen by the numbers:

- EP inside a replica, when ep divides tp (TensorRT-LLM's moe_ep x moe_tp = tp): the TP group
  is cut into tp/ep consecutive blocks of ep ranks; my EP group is my block,
  ep_rank = tp_rank % ep. The block index moe_tp_rank = tp_rank // ep (of moe_tp = tp/ep)
  says which slice of every expert this rank holds. tp 4, ep 2: EP groups {0,1} and {2,3}.
- EP across replicas, when ep is a multiple of tp and divides dp*tp (DP attention + EP, as
  vLLM / SGLang): r = ep/tp consecutive replicas form one EP group, every TP rank of them, at
  my (pp, cp) place: replicas [k*r, (k+1)*r) with k = dp_rank // r,
  ep_rank = (dp_rank % r) * tp + tp_rank; moe_tp = 1. tp 2, dp 4, ep 4: EP groups
  {0,1,2,3} and {4,5,6,7}. The replicas of one EP group step together.

(ep == tp fits both and both give the TP group.)
"""

KINDS = ("tp", "cp", "pp", "dp", "ep")


def stage_layers(num_layers, pp):
    """The (first, last + 1) layer range of each of pp pipeline stages, in stage order.

    Stages are contiguous and balanced in cost units: num_layers + 2, the embedding counted
    as one layer's worth (on the first stage) and the LM head as one (on the last). Each
    stage gets floor(units / pp) units; the units % pp left over go one each to the first
    stage, the last stage, then stages 1, 2, ... (so the layers spread as evenly as the
    units allow). 30 layers: pp 2 -> 15 15, pp 3 -> 10 10 10, pp 4 -> 7 8 8 7. When
    there are about as many stages as layers, an end stage may hold no layer at all (3
    layers, pp 4 -> 1 1 1 0: the last stage holds only the head).
    """
    if num_layers < 1 or pp < 1:
        raise ValueError(f"num_layers={num_layers} and pp={pp} must be at least 1")
    units = num_layers + 2
    if pp > units:
        raise ValueError(f"pp={pp} is more stages than the {num_layers} layers, embedding and head can fill")
    base, extra = divmod(units, pp)
    shares = [base] * pp
    for stage in ([0, pp - 1] + list(range(1, pp - 1)))[:extra]:
        shares[stage] += 1
    shares[0] -= 1  # the embedding's unit
    shares[-1] -= 1  # the head's unit
    ranges, first = [], 0
    for n in shares:
        ranges.append((first, first + n))
        first += n
    return ranges


class Mapping:
    """Every parallel rank and group of one world rank (see the module docstring).

    Attributes: world, rank, tp, pp, cp, ep, dp, ranks_per_node; tp_rank, cp_rank, pp_rank,
    dp_rank, ep_rank, moe_tp, moe_tp_rank, node (= rank // ranks_per_node); tp_group,
    cp_group, pp_group, dp_group, ep_group (lists of world ranks in position order).
    Raises ValueError, one line naming the numbers, for a layout that does not fit.
    """

    def __init__(self, world, rank, tp=1, pp=1, cp=1, ep=1, ranks_per_node=None):
        ranks_per_node = world if ranks_per_node is None else ranks_per_node
        for name, value in (("world", world), ("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep),
                            ("ranks_per_node", ranks_per_node)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name}={value} must be a whole number, at least 1")
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank} is outside the world of {world} ranks")
        if world % (tp * pp * cp):
            raise ValueError(f"tp*pp*cp = {tp}*{pp}*{cp} = {tp * pp * cp} does not divide the world of {world} ranks")
        dp = world // (tp * pp * cp)
        if tp % ep and (ep % tp or (dp * tp) % ep):
            raise ValueError(f"ep={ep} must divide tp={tp} (EP inside a replica) or be a multiple of tp "
                             f"that divides dp*tp = {dp * tp} (EP across replicas)")
        if world % ranks_per_node:
            raise ValueError(f"ranks_per_node={ranks_per_node} does not divide the world of {world} ranks")
        if ranks_per_node % tp:
            raise ValueError(f"tp={tp} does not divide the {ranks_per_node} ranks of a node: "
                             f"a TP group would cross nodes")

        self.world, self.rank, self.ranks_per_node = world, rank, ranks_per_node
        self.tp, self.pp, self.cp, self.ep, self.dp = tp, pp, cp, ep, dp
        self.node = rank // ranks_per_node
        self.tp_rank = rank % tp
        self.cp_rank = rank // tp % cp
        self.pp_rank = rank // (tp * cp) % pp
        self.dp_rank = rank // (tp * cp * pp)

        self.tp_group = [self._at(tp=i) for i in range(tp)]
        self.cp_group = [self._at(cp=i) for i in range(cp)]
        self.pp_group = [self._at(pp=i) for i in range(pp)]
        self.dp_group = [self._at(dp=i) for i in range(dp)]
        if tp % ep == 0:  # inside a replica: my block of ep consecutive TP ranks
            block = self.tp_rank // ep
            self.ep_rank, self.moe_tp, self.moe_tp_rank = self.tp_rank % ep, tp // ep, block
            self.ep_group = self.tp_group[block * ep : (block + 1) * ep]
        else:  # across replicas: every TP rank of r = ep/tp consecutive replicas
            r = ep // tp
            self.ep_rank, self.moe_tp, self.moe_tp_rank = self.dp_rank % r * tp + self.tp_rank, 1, 0
            first = self.dp_rank // r * r
            self.ep_group = [self._at(dp=d, tp=t) for d in range(first, first + r) for t in range(tp)]

    def _at(self, dp=None, pp=None, cp=None, tp=None):
        """The world rank at my place with the given indices changed."""
        dp = self.dp_rank if dp is None else dp
        pp = self.pp_rank if pp is None else pp
        cp = self.cp_rank if cp is None else cp
        tp = self.tp_rank if tp is None else tp
        return ((dp * self.pp + pp) * self.cp + cp) * self.tp + tp

    def group(self, kind):
        """The world ranks of my group of one kind ("tp", "cp", "pp", "dp", "ep")."""
        if kind not in KINDS:
            raise ValueError(f"unknown group kind {kind!r}; one of {', '.join(KINDS)}")
        return getattr(self, kind + "_group")

    def colour(self, kind):
        """(colour, key) for Comm.Split: the ranks of equal colour are exactly my group of this
        kind, and key is my position in it. The colour is the group's lowest world rank."""
        group = self.group(kind)
        return group[0], group.index(self.rank)

    def layer_range(self, num_layers):
        """(first, last + 1) of the layers my pipeline stage holds (see stage_layers)."""
        return stage_layers(num_layers, self.pp)[self.pp_rank]

    def layout(self):
        """The numbers of the layout, for the results file."""
        return dict(world=self.world, dp=self.dp, tp=self.tp, pp=self.pp, ep=self.ep, cp=self.cp,
                    ranks_per_node=self.ranks_per_node)

    def describe(self):
        """One line: "world 8 = dp 2 x pp 2 x tp 2, 2 nodes of 4 ranks"."""
        dims = ["dp", "pp"] + ["cp"] * (self.cp > 1) + ["tp"]
        text = f"world {self.world} = " + " x ".join(f"{k} {getattr(self, k)}" for k in dims)
        if self.ep > 1:
            inside = self.tp % self.ep == 0
            text += f", ep {self.ep} (" + (f"inside tp, moe_tp {self.moe_tp}" if inside else
                                          f"across {self.ep // self.tp} replicas") + ")"
        nodes, k = self.world // self.ranks_per_node, self.ranks_per_node
        return text + f", {nodes} node{'s' * (nodes > 1)} of {k} rank{'s' * (k > 1)}"

    def table(self, num_layers=None):
        """Lines rank -> node -> (dp, pp, [cp], tp, [ep]) [-> layers] for every rank, for
        printing at start; cp and ep columns only when they are above 1."""
        cols = ["dp", "pp"] + ["cp"] * (self.cp > 1) + ["tp"] + ["ep"] * (self.ep > 1)
        header = "rank node " + " ".join(f"{c:>3}" for c in cols) + "  layers" * (num_layers is not None)
        lines = [self.describe(), header]
        stages = stage_layers(num_layers, self.pp) if num_layers is not None else None
        for rank in range(self.world):
            m = Mapping(self.world, rank, self.tp, self.pp, self.cp, self.ep, self.ranks_per_node)
            line = f"{rank:4d} {m.node:4d} " + " ".join(f"{getattr(m, c + '_rank'):3d}" for c in cols)
            if stages:
                first, stop = stages[m.pp_rank]
                line += "  " + ("none" if stop == first else f"{first}" if stop == first + 1
                                else f"{first}-{stop - 1}")
            lines.append(line)
        return "\n".join(lines)
