"""verify's models in bounded memory: the dense and the simulated GPT, built as runtime.models builds
them, but with every block left on the meta device (no memory) until the forward reaches it.

A block's weights are read when it runs (a forward pre-hook: the checkpoint's memory-mapped tensors,
the shard set's pieces joined for the simulated ranks, or a shard set's pieces merged into the dense
tensors) and let go when it is done (a forward hook: the parameters back on the meta device, the
file pages read for them dropped from the process). Loading goes through what GPT.from_state_dict
and Module.to do for a whole model, block by block (load_state_dict with assign, decode_layout, the
cast to the shards' dtype), so the streamed model computes exactly what the resident one does: the
same kernels on the same layouts, bit for bit (tests/test_bounded_memory.py holds it to that).

The embeddings, ln_f and the output layer stay resident (the tied output layer in decode_layout's
transposed copy, as resident). So a model holds the embeddings, one block at a time and its
activations and KV cache; every forward reads every block again, greedy decoding's one token per
forward included: memory bounded, at the price of reading (and, for the transposed or joined
weights, copying) the model's bytes once per forward.
"""

from collections.abc import Callable, Mapping

import torch

from tpshard.comm.collectives import Collectives
from tpshard.comm.counting import CountingCollectives
from tpshard.config import GPTConfig
from tpshard.convert import dense_tensors, mapped_pieces
from tpshard.files.checkpoint import Checkpoint
from tpshard.files.pages import drop_file_pages, trim_free_memory
from tpshard.files.shardset import ShardSet
from tpshard.model import GPT
from tpshard.parallel import plan
from tpshard.parallel.grid import DENSE, Placement
from tpshard.parallel.layers import decode_layout

# a model's tensors under the given names (nanoGPT's, whole-model), read only now
Reader = Callable[[list[str]], dict[str, torch.Tensor]]
BLOCKS = "transformer.h."


def dense_model(source: Checkpoint | ShardSet, *, dtype: torch.dtype | None = None) -> GPT:
    """runtime.models.dense_model's GPT (a checkpoint as is, or a shard set merged), its blocks read
    when they run. A shard set's rank files are not checked here: verify's integrity part did."""
    tensors = source.state_dict if isinstance(source, Checkpoint) else dense_tensors(source)
    config = source.config if isinstance(source, Checkpoint) else source.manifest.config

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for name in names:  # a tied name after its source: one tensor for both, as in the checkpoint
            tied = plan.TIED.get(name)
            state[name] = state[tied] if tied in state else tensors[name]
        return state

    return _streamed(config, DENSE, Collectives(), read, dtype)


def simulated_model(shards: ShardSet) -> GPT:
    """runtime.models.simulated_model's GPT (every rank in this process, counted collectives), its
    blocks read when they run: each block's pieces joined then. The rank files are not checked
    again: verify's integrity part did."""
    m = shards.manifest
    pieces = mapped_pieces(shards)  # memory-mapped, nothing read

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        return plan.local_state_dict({name: pieces[name] for name in names if name in pieces}, m.vocab_parallel)

    placement = Placement.simulated(m.tp_size, m.vocab_parallel, m.stages if m.grid.pp > 1 else None)
    return _streamed(m.config, placement, CountingCollectives(Collectives()), read, None, sources=pieces)


def _streamed(
    config: GPTConfig,
    placement: Placement,
    comm: Collectives,
    read: Reader,
    dtype: torch.dtype | None,
    sources: Mapping[str, list[torch.Tensor]] | None = None,
) -> GPT:
    """The GPT of a placement with its blocks on the meta device, each loaded by hooks as it runs.
    sources: the memory-mapped tensors read() takes each name from, whose pages are dropped after
    the block (by default, what read() returned)."""
    with torch.device("meta"):
        shell = GPT(config, placement, comm)
    placeholders = shell.state_dict()  # meta tensors: the blocks stay empty
    resident = [name for name in placeholders if not name.startswith(BLOCKS)]
    model = GPT.from_state_dict(config, {**placeholders, **read(resident)}, placement, comm).to(dtype=dtype)
    for layer, block in model.transformer.h.items():
        loader = _BlockLoader(f"{BLOCKS}{layer}.", placeholders, read, dtype, sources)
        block.register_forward_pre_hook(loader.load)
        block.register_forward_hook(loader.unload)
    return model


class _BlockLoader:
    """One block's weights: read just before it runs, let go just after."""

    def __init__(
        self,
        prefix: str,
        placeholders: dict[str, torch.Tensor],
        read: Reader,
        dtype: torch.dtype | None,
        sources: Mapping[str, list[torch.Tensor]] | None,
    ):
        self.prefix, self.read, self.dtype, self.sources = prefix, read, dtype, sources
        self.names = [name for name in placeholders if name.startswith(prefix)]
        self.empty = {name.removeprefix(prefix): placeholders[name] for name in self.names}
        self.held: list[torch.Tensor] = []  # what the block was loaded from: its file pages are dropped after
        self.bytes = 0  # its weights' size

    def load(self, block: torch.nn.Module, _args: tuple) -> None:
        state = {name.removeprefix(self.prefix): tensor for name, tensor in self.read(self.names).items()}
        if self.sources is None:
            self.held = list(state.values())
        else:
            self.held = [piece for name in self.names for piece in self.sources.get(name, ())]
        self.bytes = sum(t.numel() * t.element_size() for t in state.values())
        block.load_state_dict(state, assign=True)
        decode_layout(block, state)  # as GPT.from_state_dict does for the whole model
        block.to(dtype=self.dtype)

    def unload(self, block: torch.nn.Module, _args: tuple, _output: torch.Tensor) -> None:
        block.load_state_dict(self.empty, assign=True)
        for tensor in self.held:
            drop_file_pages(tensor)
        self.held = []
        trim_free_memory(self.bytes)  # the block's weights, freed between the activations that live on
