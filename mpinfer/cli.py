"""Command line: `mpinfer COMMAND`. User mistakes (UserError) print one line and exit 2."""

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
@click.option("--model", "model_path", required=True, help="A .gguf file or a Hugging Face model folder.")
@click.option("--prompt", "prompts", multiple=True, help="Plain-text prompt (repeatable).")
@click.option("--chat", "chats", multiple=True, help="User message rendered with the chat template (repeatable).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
def generate(model_path, prompts, chats, max_new_tokens):
    """Greedy answers to a few prompts, split over the MPI ranks; rank 0 prints them in order."""
    from mpi4py import MPI

    from .backend import get_backend
    from .model import Decoder
    from .tokenizer import load_tokenizer
    from .weights import open_checkpoint

    comm = MPI.COMM_WORLD
    ckpt = open_checkpoint(model_path)
    tokenizer = load_tokenizer(model_path, ckpt)
    model = Decoder(ckpt, get_backend("numpy"))
    requests = [tokenizer.encode(p) for p in prompts]
    requests += [tokenizer.encode_chat([{"role": "user", "content": c}]) for c in chats]
    stop = set(ckpt.config.eos_token_ids)
    mine = {i: model.generate_greedy(ids, max_new_tokens, stop) for i, ids in enumerate(requests) if i % comm.size == comm.rank}
    answers = comm.gather(mine, root=0)
    if comm.rank == 0:
        merged = {i: out for part in answers for i, out in part.items()}
        for i, text in enumerate(list(prompts) + list(chats)):
            click.echo(f"[{i}] {text}\n    -> {tokenizer.decode(merged[i])}")
