"""The decoder: every supported architecture is this one model with options from
ModelConfig (biases, q/k norm, sliding windows, RoPE scaling, tied embeddings).

    model = Decoder.load("model.gguf")              # or a Hugging Face folder
    pool = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks=64)
    seq = pool.sequence()
    logits = model.forward(ids, [seq], [len(ids)])  # prefill: (1, V) for the last token
    logits = model.forward([next_id], [seq], [1])   # decode step

A forward pass takes the new tokens of several sequences at once, concatenated, so prefill
chunks and decode steps of different requests share every matmul; only attention looks at
each sequence's own cache (engine/scheduler.py drives it).
"""

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import rope
from .backend import get_backend
from .layers import MLP, TP, Attention, RMSNorm, check_tp, kv_heads_of
from .moe import EP, MoE, check_ep
from .weights import open_checkpoint


class Block:
    def __init__(self, cfg, be, ckpt, layer, tp, ep, slot, cp_method):
        p = f"model.layers.{layer}"
        self.input_norm = RMSNorm(be, ckpt, f"{p}.input_layernorm", cfg.hidden_size, cfg.rms_eps, matmul_input=True)
        self.attn = Attention(cfg, be, ckpt, layer, tp, slot, cp_method)
        self.post_attention_norm = RMSNorm(be, ckpt, f"{p}.post_attention_layernorm", cfg.hidden_size, cfg.rms_eps,
                                           matmul_input=True)
        moe = cfg.moe_layers and cfg.moe_layers[layer]
        self.mlp = MoE(cfg, be, ckpt, layer, tp, ep) if moe else MLP(cfg, be, ckpt, layer, tp)

    def __call__(self, x, h, cos, sin, kv, batch, next_norm=None):
        """x (T, D): the residual stream; h: input_norm(x) when the block before computed it,
        else None. Returns (x + attention + MLP, next_norm of it or None). Each residual add
        is fused with the norm that reads its sum (backend.add_rmsnorm: one pass over the
        rows instead of two; on GPUs x is updated in place)."""
        x, h = self.post_attention_norm.add(x, self.attn(self.input_norm(x) if h is None else h, cos, sin, kv, batch))
        delta = self.mlp(h)
        return next_norm.add(x, delta) if next_norm is not None else (x + delta, None)


class Decoder:
    """tp_group: comm.Group of this rank's tensor-parallel group, or None. With TP the
    embedding and the LM head are vocab-parallel: this rank holds vocabulary rows
    [vocab_offset, vocab_offset + V/P), and the logits it returns cover those only
    (engine/logits.py finishes softmax, argmax and top-N over the group).

    layers: the range of layers this rank holds (a pipeline stage); the first stage also
    holds the embedding, the last the final norm and the LM head. Its KV cache pool holds
    those layers only.

    sp: sequence parallelism in the TP group (layers.TP): between layers a rank holds 1/tp of
    the tokens' rows; run_layers takes and returns those. ep: moe.EP, this rank's place for expert parallelism (default: none; every expert here,
    split over the TP group like the dense MLP). cp_method: "ring" or "ulysses", how a long
    prompt's prefill attention runs over the CP group of its KV pool (context.py)."""

    def __init__(self, ckpt, be, tp_group=None, layers=None, ep=None, cp_method="ring", sp=False, graphs=True):
        cfg = self.config = ckpt.config
        self.be = be
        self.tp = tp = TP(be.group(tp_group), sp)  # on GPUs: NCCL inside a node, else host-staged MPI
        ep = ep or EP(slices=tp.size, slice=tp.rank)
        if ep.group is not None:  # EP across replicas: all-to-all of the backend's arrays
            ep = dataclasses.replace(ep, group=be.group(ep.group))
        check_tp(cfg, tp.size)
        check_ep(cfg, ep.size, ep.slices)
        self.layers = layers or (0, cfg.num_layers)
        self.first, self.last = self.layers[0] == 0, self.layers[1] == cfg.num_layers
        self.kv_heads = kv_heads_of(cfg, tp)[1]  # per rank: the KV cache's head count
        vocab = tp.part(cfg.vocab_size)
        self.vocab_offset = vocab.start
        embed = lambda: be.weight(ckpt.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), vocab))
        self.embed = embed() if self.first else None
        # Reading (and dequantizing) is large numpy work that releases the GIL: one thread
        # per core roughly halves load time on 2 cores.
        with ThreadPoolExecutor(min(4, len(os.sched_getaffinity(0)))) as pool:
            self.blocks = list(pool.map(lambda i: Block(cfg, be, ckpt, i, tp, ep, i - self.layers[0], cp_method), range(*self.layers)))
        if self.last:
            self.norm = RMSNorm(be, ckpt, "model.norm", cfg.hidden_size, cfg.rms_eps, matmul_input=True)
            if cfg.tie_embeddings:
                self.lm_head = self.embed if self.first else embed()  # (V/P, D)
            else:
                self.lm_head = be.weight(ckpt.get("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), vocab))
        divisors = ckpt.get("rope_freqs", (cfg.head_dim // 2,)) if cfg.rope.type == "gguf_freqs" else None
        self.inv_freq = rope.inv_freq(cfg.rope, cfg.head_dim, divisors)
        # graphs: decode steps replay a CUDA graph where the backend and the layout allow (step())
        self.graphs = be.decode_graphs(self) if graphs else None

    @classmethod
    def load(cls, path, backend="numpy"):
        return cls(open_checkpoint(path), get_backend(backend))

    def forward(self, ids, seqs, counts, all_logits=False):
        """The whole model on one rank (or TP group). ids: the new tokens of len(seqs)
        sequences, concatenated (sum(counts),); seqs: kvcache.SequenceCache of one pool.
        Returns float32 logits (len(seqs), V/P) for each sequence's last new token, or
        (sum(counts), V/P) for every token with all_logits. Stores the new tokens' K/V and
        commits them to each sequence. Collective over the TP group."""
        batch = seqs[0].pool.batch(seqs, counts)
        ids = np.asarray(ids, np.int64)
        return self.step(ids, batch, np.arange(len(ids)) if all_logits else np.cumsum(counts) - 1)

    def step(self, ids, batch, last_tokens):
        """One engine step of a whole model (first and last pipeline stage): the layers on ids
        (T,) int64, this rank's new tokens of batch, whose K/V this stores and commits. Returns
        the float32 logits (R, V/P) of the step's tokens at last_tokens (R of them; None when
        R = 0). A step of decode rows only may replay a CUDA graph (self.graphs.takes)."""
        logits = None
        if self.graphs is not None and len(last_tokens) == len(ids) and self.graphs.takes(batch):
            logits = self.graphs.logits(ids, batch)  # decode rows: each one its sequence's last token
        if logits is None:  # not a graph's step, or its capture failed (graphs are then off)
            x = self.run_layers(self.embed_tokens(ids), batch)
            logits = self.logits(self.final_rows(x, batch, last_tokens)) if len(last_tokens) else None
        batch.commit()
        return logits

    def embed_tokens(self, ids):
        """(T,) token ids (host int64, or a device buffer) -> (T, D). Vocab-parallel lookup: rows
        of other ranks' ids are zero here, the all-reduce fills them."""
        self.tp.tokens = len(ids)
        return self.tp.finish(self.be.embedding(self.embed, ids, self.vocab_offset))

    def run_layers(self, x, batch):
        """This rank's layers on x (T, D); batch: kvcache.Batch, where K/V go and come from."""
        self.tp.tokens = len(batch.positions)
        cos, sin = self.be.rope_tables(self.inv_freq, batch)  # (T, Dh/2) each
        h = None
        for i, block in enumerate(self.blocks):
            next_norm = self.blocks[i + 1].input_norm if i + 1 < len(self.blocks) else None
            x, h = block(x, h, cos, sin, batch.pool, batch, next_norm)
        return x

    def moe_layers(self):
        """{layer id: MoE} of this rank's MoE layers."""
        return {self.layers[0] + i: b.mlp for i, b in enumerate(self.blocks) if isinstance(b.mlp, MoE)}

    def expert_load(self):
        """(MoE layers of this rank, E) routed (token, expert) pairs so far, and their layer ids."""
        moe = self.moe_layers()
        return list(moe), np.array([m.load for m in moe.values()]).reshape(len(moe), -1)

    def final_rows(self, x, batch, last_tokens):
        """(R, D) final hidden states of the step's tokens at last_tokens, on every rank of
        the TP group (under sp they are spread over it) and of the CP group."""
        return self.tp.pick(x, last_tokens) if batch.shares is None else batch.last_rows(x, last_tokens)

    def logits(self, x):
        """(R, D) final hidden states -> (R, V/P) float32 logits of this rank's vocabulary rows."""
        return self.be.to_numpy(self.head(x))

    def head(self, x):
        """The final norm and the LM head: (R, D) -> (R, V/P) logits, the backend's array."""
        return self.be.linear(self.norm(x), self.lm_head)
