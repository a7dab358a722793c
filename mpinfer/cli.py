"""Command line: `mpinfer COMMAND`. User mistakes (UserError) print one line and exit 2."""

import json
import os
import sys

import click

from . import __version__
from .errors import EXIT_BAD_INPUT, UserError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"mpinfer: error: {e}", err=True)
            ctx.exit(EXIT_BAD_INPUT)


@click.group(cls=_Group)
@click.version_option(__version__)
def main():
    """MPI batch inference for large language models."""


@main.command()
@click.argument("name", type=click.Choice(["smollm2"]))
@click.option("--cache", type=click.Path(file_okay=False), help="Cache folder (default $MPINFER_CACHE or ~/.cache/mpinfer).")
def fetch(name, cache):
    """Download a known test model into the cache and print its path."""
    from .fetch import fetch_smollm2

    click.echo(fetch_smollm2(cache))


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a job file key (repeatable).")
@click.option("--skip-invalid", is_flag=True, help="Record invalid prompt lines as errors and run the rest.")
@click.option("--overwrite", is_flag=True, help="Replace an existing results file instead of resuming it.")
def run(job_file, overrides, skip_invalid, overwrite):
    """Run every prompt of a job; resumes an interrupted results file."""
    from mpi4py import MPI

    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    _share_cores(node)  # before numpy loads its BLAS
    from .engine.runner import run_job

    try:
        code = run_job(job_file, overrides, skip_invalid, overwrite)
    except UserError:
        raise  # rank 0 only: the others return EXIT_BAD_INPUT
    except Exception:
        if MPI.COMM_WORLD.size == 1:
            raise
        # one rank failing must end the whole job, not leave the others waiting for it
        import traceback

        traceback.print_exc()
        print(f"mpinfer: rank {MPI.COMM_WORLD.rank} failed; aborting the job", file=sys.stderr, flush=True)
        MPI.COMM_WORLD.Abort(1)
    sys.exit(code)


def _share_cores(node):
    """Give each rank's BLAS its share of the cores, unless the user chose: when the ranks of
    the node may all run on the same cores (no binding), an equal part of them; when the
    launcher bound each rank to its own cores (srun -c, mpiexec --bind-to), all of those."""
    mine = os.sched_getaffinity(0)
    width = (os.cpu_count() + 7) // 8  # the node's CPUs: the same on all its ranks
    mask = sum(1 << cpu for cpu in mine).to_bytes(width, "little")
    masks = bytearray(width * node.size)
    node.Allgather(mask, masks)
    same = all(masks[i * width : (i + 1) * width] == mask for i in range(node.size))
    threads = str(max(1, len(mine) // node.size) if same else len(mine))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, threads)


@main.command()
@click.argument("results_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--show", default=0, type=click.IntRange(0), metavar="N", help="Also print the first N answers.")
def inspect(results_file, as_json, show):
    """Summarise a results file."""
    from .io.results import read_rows, summary

    info = summary(results_file)
    if show:
        rows = read_rows(results_file)
        info["answers"] = [{"id": rows["id"][i], "finish_reason": rows["finish_reason"][i], "text": rows["output_text"][i]}
                           for i in range(min(show, len(rows["id"])))]
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key != "answers":
            click.echo(f"{key:>18}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    for a in info.get("answers", []):
        click.echo(f"\n[{a['id']}] ({a['finish_reason']})\n{a['text']}")
