"""verify's models in bounded memory: the dense and the simulated GPT, built as runtime.models builds
them, but with their weights left on the meta device (no memory) until the forward reaches them.

Each block and the output layer is read when it runs (a forward pre-hook: the
checkpoint's memory-mapped tensors, the shard set's pieces joined for the simulated ranks, or a shard
set's pieces merged into the dense tensors) and let go when it is done (a forward hook: the parameters
back on the meta device, the file pages read for them dropped from the process). Loading goes through
what GPT.from_state_dict and Module.to do for a whole model, module by module (load_state_dict with
assign, decode_layout, the cast to the shards' dtype), so the streamed model computes exactly what the
resident one does: the same kernels on the same layouts, bit for bit (tests/test_bounded_memory.py
holds it to that). The tied embedding and output layer are held each on its own: the embedding stays
resident as the file's tensor (memory-mapped: no copy, its rows read as tokens look them up), the
output layer is read when it runs, in decode_layout's transposed copy as the resident model's shared
parameter is; the same values either way.

So a model holds the embeddings (wte, wpe: mapped from the file, or joined in memory for a
vocabulary-parallel set), ln_f and one streamed module's weights at a time (a block, or the output
layer), besides its activations and KV cache. Every forward reads every block and the output layer
again, greedy decoding's one token per forward included: memory bounded, at the price of reading
(and, for the transposed or joined weights, copying) the model's bytes once per forward.
"""

from collections.abc import Callable, Mapping

import torch

from tpshard.comm.collectives import LOCAL, Collectives
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
        return {name: tensors[name] for name in names}

    return _streamed(config, DENSE, LOCAL, read, dtype)


def simulated_model(shards: ShardSet, sequence_parallel: bool = False) -> GPT:
    """runtime.models.simulated_model's GPT (every rank in this process, counted collectives), its
    blocks read when they run: each block's pieces joined then. The rank files are not checked
    again: verify's integrity part did."""
    m = shards.manifest
    pieces = mapped_pieces(shards)  # memory-mapped, nothing read

    def read(names: list[str]) -> dict[str, torch.Tensor]:  # plan.local_state_dict's, a module at a time
        return {name: plan.join_local_ranks(name, pieces[_stored(name, pieces)], m.vocab_parallel) for name in names}

    placement = Placement.simulated(m.tp_size, m.vocab_parallel, m.stages if m.grid.pp > 1 else None)
    model = _streamed(m.config, placement, CountingCollectives(Collectives()), read, None, sources=pieces)
    model.sequence_parallel = sequence_parallel
    return model


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
    placeholders = shell.state_dict()  # meta tensors: the streamed modules stay empty
    streamed = [f"{BLOCKS}{layer}." for layer in shell.transformer.h] + (["lm_head."] if shell.last else [])
    state = read([name for name in placeholders if not name.startswith(tuple(streamed))])
    model = GPT.from_state_dict(config, placeholders | state, placement, comm)
    if plan.EMBEDDING in state:  # GPT._tie made it the (empty) output layer's: it keeps its own tensor
        model.transformer.wte.load_state_dict({"weight": state[plan.EMBEDDING]}, assign=True)
    model = model.to(dtype=dtype)
    for prefix in streamed:
        module = model.get_submodule(prefix.removesuffix("."))
        loader = _Loader(prefix, placeholders, read, dtype, sources)
        module.register_forward_pre_hook(loader.load)
        module.register_forward_hook(loader.unload)
    return model


class _Loader:
    """One module's weights (a block, the embedding, the output layer): read just before it runs, let
    go just after."""

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
        self.held: list[torch.Tensor] = []  # what the module was loaded from: its file pages are dropped after
        self.bytes = 0  # its weights' size

    def load(self, module: torch.nn.Module, _args: tuple) -> None:
        state = {name.removeprefix(self.prefix): tensor for name, tensor in self.read(self.names).items()}
        if self.sources is None:
            self.held = list(state.values())
        else:
            self.held = [piece for name in self.names for piece in self.sources[_stored(name, self.sources)]]
        self.bytes = sum(t.numel() * t.element_size() for t in state.values())
        module.load_state_dict(state, assign=True)
        decode_layout(module, state)  # as GPT.from_state_dict does for the whole model
        module.to(dtype=self.dtype)

    def unload(self, module: torch.nn.Module, _args: tuple, _output: torch.Tensor) -> None:
        module.load_state_dict(self.empty, assign=True)
        for tensor in self.held:
            drop_file_pages(tensor)
        self.held = []
        trim_free_memory(self.bytes)  # the weights, freed between the activations that live on


def _stored(name: str, pieces: Mapping[str, list[torch.Tensor]]) -> str:
    """The name a shard set stores a tensor under: the tied output layer is the embedding's pieces
    unless the set holds the last stage's own copy."""
    return name if name in pieces else plan.TIED.get(name, name)
