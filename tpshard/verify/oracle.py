"""verify --oracle torch: the same weights through PyTorch's own tensor parallelism, as a second opinion
that shares none of tpshard's parallel code. tpshard's sharded run and its dense run are both tpshard's:
a mistake common to the two (the way q, k, v are cut, a bias added on every rank) would pass numerics.

The oracle is a small nanoGPT written here on plain torch.nn (`TorchGPT`: nanoGPT's modules and names),
parallelized with `torch.distributed.tensor.parallel.parallelize_module` on a 1-D device mesh of N
processes (gloo on CPU, NCCL on CUDA, started by runtime.launch), and loaded from the shard set's DCP
export by `torch.distributed.checkpoint.load`, which cuts each rank's slice itself. Nothing of tpshard's
split rules, parallel layers or collectives is used: the shard set is merged, written as DCP, and PyTorch
does the rest.

    attn.c_attn   q, k, v stacked as (3, C, C): ColwiseParallel's cut (Shard on output rows) applied to
                  each of the three, i.e. Shard(1) of the stack, so rank r computes q, k, v of its heads
    attn.c_proj   RowwiseParallel (bias added once, after the all-reduce)
    mlp.c_fc      ColwiseParallel
    mlp.c_proj    RowwiseParallel
    the rest      replicated (embeddings, LayerNorms, the tied lm_head)

A plain ColwiseParallel on nanoGPT's fused (3C, C) c_attn cuts it in N contiguous blocks of rows, which
for N > 1 mixes q, k and v (for N = 2, rank 0 holds all of q and half of k): qkv=FUSED builds exactly
that, and the tests hold the oracle to telling it apart.
"""

import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

from tpshard.config import GPTConfig
from tpshard.convert import merge_shards
from tpshard.errors import TpshardError
from tpshard.files.dcp import FUSED, STACKED, checked_reader, save_dcp
from tpshard.files.shardset import ShardSet
from tpshard.runtime import launch
from tpshard.runtime.launch import Group
from tpshard.verify.report import Oracle

ORACLES = ("torch",)
QKV = STACKED  # how the oracle cuts c_attn; FUSED is the wrong cut, kept to show that it is caught
PLAN = {
    STACKED: {
        "attn.c_attn": "ColwiseParallel on each of q, k, v: (3, C, C) stacked, Shard(1)",
        "attn.c_proj": "RowwiseParallel",
        "mlp.c_fc": "ColwiseParallel",
        "mlp.c_proj": "RowwiseParallel",
        "wte, wpe, LayerNorms, lm_head": "replicated",
    },
    FUSED: {
        "attn.c_attn": "ColwiseParallel on the fused (3C, C): contiguous rows, q, k, v mixed (wrong on purpose)",
        "attn.c_proj": "RowwiseParallel",
        "mlp.c_fc": "ColwiseParallel",
        "mlp.c_proj": "RowwiseParallel",
        "wte, wpe, LayerNorms, lm_head": "replicated",
    },
}


# --- the reference model: nanoGPT on plain torch.nn ---------------------------------------------------


class StackedLinear(nn.Module):
    """`parts` linear maps of one input as one (parts, out, in) weight: nanoGPT's fused c_attn as q, k, v
    stacked. Output (..., parts, out)."""

    def __init__(self, in_features: int, out_features: int, parts: int, bias: bool):
        super().__init__()
        self.parts = parts
        self.weight = nn.Parameter(torch.empty(parts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(parts, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biases = [None] * self.parts if self.bias is None else [self.bias[i] for i in range(self.parts)]
        return torch.stack([F.linear(x, self.weight[i], biases[i]) for i in range(self.parts)], dim=-2)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, qkv: str):
        super().__init__()
        C, bias = config.n_embd, config.bias
        self.c_attn = StackedLinear(C, C, 3, bias) if qkv == STACKED else nn.Linear(C, 3 * C, bias=bias)
        self.c_proj = nn.Linear(C, C, bias=bias)
        self.head_size = C // config.n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # this process's share: (B, T, 3, width), width = C / N, its heads' q, k, v (if c_attn was cut right)
        q, k, v = self.c_attn(x).reshape(B, T, 3, -1).unbind(2)
        q, k, v = (t.reshape(B, T, -1, self.head_size).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_new" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, qkv: str):
        super().__init__()
        eps, C = config.layer_norm_epsilon, config.n_embd
        self.ln_1 = nn.LayerNorm(C, eps=eps, bias=config.bias)
        self.attn = Attention(config, qkv)
        self.ln_2 = nn.LayerNorm(C, eps=eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    """nanoGPT's GPT (module names, tied lm_head, forward) with c_attn stacked (qkv=STACKED, what a DCP
    export holds) or fused (FUSED, nanoGPT's own module)."""

    def __init__(self, config: GPTConfig, qkv: str = STACKED):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "h": nn.ModuleList([Block(config, qkv) for _ in range(config.n_layer)]),
                "ln_f": nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """The logits of every position."""
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# --- PyTorch's tensor parallelism ---------------------------------------------------------------------


def _stacked_colwise() -> object:
    """ColwiseParallel for a StackedLinear: the same input and output handling, each part's weight and
    bias cut by output rows (Shard(1) of the stack)."""
    from torch.distributed.tensor import Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel

    class StackedColwiseParallel(ColwiseParallel):
        def _apply(self, module: nn.Module, device_mesh: object) -> nn.Module:
            if not isinstance(module, StackedLinear):
                raise TypeError(f"StackedColwiseParallel takes a StackedLinear, not a {type(module).__name__}")

            def partition(_name: str, mod: nn.Module, mesh: object) -> None:
                for name, param in list(mod.named_parameters(recurse=False)):
                    shard = distribute_tensor(param, mesh, [Shard(1)], src_data_rank=self.src_data_rank)
                    mod.register_parameter(name, nn.Parameter(shard, requires_grad=param.requires_grad))

            return distribute_module(
                module,
                device_mesh,
                partition,
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
            )

    return StackedColwiseParallel(output_layouts=Shard(3))  # (B, T, 3, C): each part's output rows


def tp_plan(config: GPTConfig, qkv: str = STACKED) -> dict[str, object]:
    """parallelize_module's plan for TorchGPT, by module name."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, object] = {}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}"
        plan[f"{h}.attn.c_attn"] = _stacked_colwise() if qkv == STACKED else ColwiseParallel()
        plan[f"{h}.attn.c_proj"] = RowwiseParallel()
        plan[f"{h}.mlp.c_fc"] = ColwiseParallel()
        plan[f"{h}.mlp.c_proj"] = RowwiseParallel()
    return plan


def parallel_model(config: GPTConfig, dtype: torch.dtype, device: torch.device, qkv: str = STACKED) -> TorchGPT:
    """TorchGPT parallelized over every rank of the default process group, its memory allocated but not
    set (built on the meta device: dcp.load fills it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    with torch.device("meta"):
        model = TorchGPT(config, qkv).to(dtype)
    parallelize_module(model, mesh, tp_plan(config, qkv))
    model.to_empty(device=device)
    model.lm_head.weight = model.transformer.wte.weight  # tied, as nanoGPT's
    return model.eval()


def load_export(model: nn.Module, directory: str | Path) -> None:
    """dcp.load of a DCP directory into a (parallelized) model, on every rank: each reads its own slices."""
    import torch.distributed.checkpoint as dcp

    state = model.state_dict()
    dcp.load(state, storage_reader=checked_reader(directory))
    model.load_state_dict(state)  # DTensors and plain tensors alike were loaded in place; this checks the keys


def logits_on_rank(
    group: Group, directory: str, config: GPTConfig, dtype: torch.dtype, batches: list, qkv: str, out: str
) -> None:
    """One rank of the oracle: its slices from the DCP export, a forward of every batch; rank 0 saves the
    logits (replicated: every rank holds them whole)."""
    model = parallel_model(config, dtype, group.device, qkv)
    load_export(model, directory)
    with torch.no_grad():
        logits = [model(idx.to(group.device)).float().cpu() for idx in batches]
    if group.rank == 0:
        torch.save(logits, out)
    group.barrier()  # leave together: a gloo rank torn down while a peer still ran was seen to abort (torchrun)


def torch_logits(
    directory: str | Path,
    config: GPTConfig,
    dtype: torch.dtype,
    batches: list[torch.Tensor],
    nproc: int,
    *,
    qkv: str = STACKED,
    device: str = "cpu",
) -> list[torch.Tensor]:
    """The logits of every batch, from PyTorch's tensor parallelism on nproc processes, loaded from the
    DCP export in directory (nproc need not be the shard set's tp: DCP reshards; it must divide n_head)."""
    if launch.started_by_torchrun():
        raise TpshardError("verify --oracle torch starts its own ranks; run it without torchrun")
    if nproc < 1 or config.n_head % nproc:
        raise TpshardError(f"the torch oracle on {nproc} processes: must divide n_head={config.n_head}")
    with tempfile.TemporaryDirectory(prefix="tpshard-oracle-") as tmp:
        out = Path(tmp, "logits.pt")
        launch.run(logits_on_rank, (str(directory), config, dtype, batches, qkv, str(out)), nproc=nproc, device=device)
        return torch.load(out, weights_only=True)


# --- the verdict ------------------------------------------------------------------------------------


def check(
    shards: ShardSet,
    batches: list[torch.Tensor],
    sharded_logits: list[torch.Tensor],
    dense_logits: list[torch.Tensor],
    atol: float,
    rtol: float,
    *,
    qkv: str | None = None,
    nproc: int | None = None,
    device: str = "cpu",
) -> Oracle:
    """PyTorch's logits of the shard set's weights (merged, exported as DCP) against tpshard's sharded run
    and the dense model's, elementwise within atol + rtol * |reference|, in the set's dtype. The rank
    files' sha256 are not checked again: verify's integrity part has just done it."""
    qkv = qkv or QKV
    m = shards.manifest
    nproc = nproc or m.tp_size
    with tempfile.TemporaryDirectory(prefix="tpshard-oracle-") as tmp:
        export = Path(tmp, "dcp")
        save_dcp(merge_shards(shards, checksum=False), export, qkv=qkv)
        logits = torch_logits(export, m.config, m.dtype, batches, nproc, qkv=qkv, device=device)
    oracle = Oracle(
        passed=False,
        torch_version=torch.__version__,
        processes=nproc,
        backend="nccl" if device == "cuda" else "gloo",
        plan=dict(PLAN[qkv]),
        atol=atol,
        rtol=rtol,
        logits_total=sum(t.numel() for t in logits),
    )
    oracle.vs_sharded_max_abs, oracle.vs_sharded_outside = _differ(sharded_logits, logits, atol, rtol)
    oracle.vs_dense_max_abs, oracle.vs_dense_outside = _differ(logits, dense_logits, atol, rtol)
    for what, outside, worst in (
        ("tpshard's sharded run", oracle.vs_sharded_outside, oracle.vs_sharded_max_abs),
        ("the dense model", oracle.vs_dense_outside, oracle.vs_dense_max_abs),
    ):
        if outside:
            oracle.problems.append(
                f"PyTorch's tensor parallelism and {what} disagree: {outside:,} of {oracle.logits_total:,} logits "
                f"outside atol {atol:g} + rtol {rtol:g}·|reference| (max abs diff {worst:.3g})"
            )
    oracle.passed = not oracle.problems
    return oracle


def _differ(sides: list[torch.Tensor], references: list[torch.Tensor], atol: float, rtol: float) -> tuple[float, int]:
    """(max abs diff over the finite differences, elements outside atol + rtol * |reference|; NaN and
    infinities on either side count as outside)."""
    worst, outside = 0.0, 0
    for side, ref in zip(sides, references, strict=True):
        side, ref = side.double(), ref.double()
        diff = (side - ref).abs()
        outside += int((~(diff <= atol + rtol * ref.abs())).sum())
        finite = diff[torch.isfinite(diff)]
        worst = max(worst, float(finite.max()) if finite.numel() else float("nan"))
    return worst, outside
