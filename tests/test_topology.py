"""Topology and comm.Group under real mpiexec: tests/mpi_topology_check.py builds every layout
that fits 1, 2, 4 and 8 ranks and checks each group's collectives and counters against
closed forms (see that script). 8 ranks pretend to be 2 nodes of 4 (MPINFER_RANKS_PER_NODE)."""

import os
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)
SCRIPT = os.path.join(os.path.dirname(__file__), "mpi_topology_check.py")


@pytest.mark.parametrize("ranks,ranks_per_node", [(1, None), (2, None), (4, None), (8, 4)])
def test_topology_under_mpiexec(ranks, ranks_per_node):
    env = {k: v for k, v in os.environ.items() if k != "MPINFER_RANKS_PER_NODE"}
    if ranks_per_node:
        env["MPINFER_RANKS_PER_NODE"] = str(ranks_per_node)
    cmd = [os.path.join(BIN, "mpiexec"), "-n", str(ranks), sys.executable, "-m", "mpi4py", SCRIPT]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    assert "layouts ok" in done.stdout
    if ranks == 8:  # the table of dp 2 x pp 2 x tp 2 over two nodes, printed by rank 0
        assert "world 8 = dp 2 x pp 2 x tp 2, 2 nodes of 4 ranks" in done.stdout
