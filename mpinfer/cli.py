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
    node.Free()
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


class _OneLineUsage(click.Command):
    """A bad option value or an unknown option as one line, like any UserError."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            raise UserError(f"{info_name}: {e.format_message()}") from None


@main.command(cls=_OneLineUsage)
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--shards", required=True, type=click.IntRange(1), metavar="N",
              help="The job's number of array tasks (input.shard = I/N).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a job file key, as the tasks did (repeatable).")
def merge(job_file, shards, overrides):
    """Join a job array's shard files into the job's results file."""
    from .io.merge import merge as merge_shards

    path, rows = merge_shards(job_file, overrides, shards)
    click.echo(f"mpinfer: wrote {path}: {rows} requests from {shards} shard files")


@main.command(cls=_OneLineUsage)
@click.option("--model", metavar="NAME|FOLDER|GGUF", help="A preset (llama3-8b, llama3-70b, llama3-405b, mixtral-8x7b, "
              "mixtral-8x22b, deepseek-v3-sized), a Hugging Face folder or a .gguf file.")
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--gpus-per-node", type=int, default=8, show_default=True)
@click.option("--gpu", default="h100", show_default=True, help="h100, h200, a100 or mi300x.")
@click.option("--intra", default="nvlink", show_default=True, help="Link inside a node: nvlink or pcie5.")
@click.option("--inter", default="ib-ndr", show_default=True, help="Link between nodes: ib-ndr, ib-hdr or roce.")
@click.option("--objective", default="throughput", show_default=True, help="throughput or latency.")
@click.option("--batch", type=int, default=128, show_default=True, help="Sequences each replica keeps in flight.")
@click.option("--prompt-len", type=int, default=1024, show_default=True)
@click.option("--gen-len", type=int, default=256, show_default=True)
@click.option("--profile", type=click.Path(dir_okay=False), help="A calibration profile: its links replace the presets.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranking and the explanation as JSON.")
@click.option("--emit-sbatch", type=click.Path(dir_okay=False), help="Write a SLURM batch script for the best layout.")
@click.option("--calibrate", "calibrate_", is_flag=True, help="Measure this MPI world's links (run under the launcher).")
@click.option("--out", default="profile.json", show_default=True, help="Where --calibrate saves the profile.")
@click.option("--max-bytes", type=int, default=32 * 2**20, show_default=True, help="Largest message --calibrate sends.")
def plan(model, nodes, gpus_per_node, gpu, intra, inter, objective, batch, prompt_len, gen_len, profile, as_json,
         emit_sbatch, calibrate_, out, max_bytes):
    """Rank the parallel layouts of a model on a cluster, or calibrate the cluster's links."""
    if calibrate_:
        return _calibrate(out, max_bytes)
    from . import planner
    from .calibrate import load_links
    from .costmodel import Workload

    if model is None:
        raise UserError("plan: --model is required (a preset name, a Hugging Face folder or a .gguf file)")
    for name, value in (("--batch", batch), ("--prompt-len", prompt_len), ("--gen-len", gen_len)):
        if value < 1:
            raise UserError(f"plan: {name} must be at least 1, got {value}")
    cfg = planner.model_config(model)
    cluster = planner.cluster(nodes, gpus_per_node, gpu, intra, inter, load_links(profile) if profile else None)
    work = Workload(batch=batch, prompt_len=prompt_len, gen_len=gen_len)
    ranked = planner.rank(cfg, work, cluster, objective)
    explanation = planner.explain(ranked, objective, work)
    if emit_sbatch:
        with open(emit_sbatch, "w") as f:
            f.write(_sbatch(model, objective, cluster, work, ranked[0], os.path.basename(emit_sbatch)))
    if as_json:
        import dataclasses

        click.echo(json.dumps({"model": model, "objective": objective, "workload": dataclasses.asdict(work),
                               "cluster": {"nodes": nodes, "gpus_per_node": gpus_per_node, "gpu": cluster.gpu.name,
                                           "intra": cluster.intra.name, "inter": cluster.inter.name},
                               "layouts": [e.to_json() for e in ranked], "explanation": explanation}, indent=2))
        return
    click.echo(f"{model} on {nodes} x {gpus_per_node} {cluster.gpu.name} ({cluster.intra.name}; "
               f"{cluster.inter.name} between nodes), {objective}:")
    for line in planner.table(ranked):
        click.echo(line)
    click.echo("\n" + explanation)
    if emit_sbatch:
        click.echo(f"\nwrote {emit_sbatch}")


def _calibrate(out, max_bytes):
    from mpi4py import MPI

    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    _share_cores(node)  # the matmul before each op, as in a run
    node.Free()
    from .calibrate import calibrate, save

    profile = calibrate(MPI.COMM_WORLD, max_bytes)
    if profile is None:  # not rank 0
        return
    save(profile, out)
    for kind, backends in profile["links"].items():
        for backend, ops in backends.items():
            for op, m in ops.items():
                click.echo(f"{kind:>5} {backend:>4} {op:>10}: {m['latency_s'] * 1e6:8.1f} us + bytes / "
                           f"{m['bandwidth_Bps'] / 1e9:.2f} GB/s (fit within {m['fit_max_rel_err']:.0%})")
    click.echo(f"wrote {out}")


def _sbatch(model, objective, cluster, work, best, name):
    """A SLURM batch script running a job file with the best layout: one rank per GPU, ranks
    of a node consecutive (--distribution=block, what mapping.py assumes)."""
    lay = best.layout
    sets = " ".join(f"--set parallel.{k}={getattr(lay, k)}" for k in ("tp", "pp", "ep", "cp", "micro_batches"))
    return f"""#!/bin/bash
# mpinfer plan --model {model} --objective {objective}: {lay}
# predicted {best.throughput:,.0f} generated tokens/s, {best.tpot_s * 1e3:.1f} ms per token, \
{best.memory['total'] / 1e9:.1f} GB per GPU ({work.batch} sequences of {work.prompt_len} + {work.gen_len} tokens per replica)
# usage: sbatch {name} JOB.toml
#SBATCH --job-name=mpinfer
#SBATCH --nodes={cluster.nodes}
#SBATCH --ntasks-per-node={cluster.gpus_per_node}
#SBATCH --gpus-per-node={cluster.gpus_per_node}
set -euo pipefail
JOB=${{1:?usage: sbatch {name} JOB.toml}}
srun --mpi=pmi2 --distribution=block --gpus-per-task=1 mpinfer run "$JOB" {sets} --set engine.max_seqs={work.batch}
"""
