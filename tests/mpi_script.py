"""The main of a check script run under mpiexec: an exception on one rank prints its
traceback and aborts the whole job (the other ranks would otherwise wait in a collective)."""

import sys
import traceback

from mpi4py import MPI


def run(main):
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        MPI.COMM_WORLD.Abort(1)
