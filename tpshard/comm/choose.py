"""Which collectives a distributed rank uses (--comm): shared memory (shm.py) where it can serve the
group, else the process group's own backend (gloo on CPU, NCCL on CUDA).

    auto   shm when every rank of the group can take part, else the process group
    shm    shm, or a TpshardError saying why not
    gloo   the process group (NCCL on CUDA)

The choice is made together: every rank gathers every rank's verdict and picks from the same list, so
no rank can pick shm while another picks gloo (that would hang both).
"""

import torch
import torch.distributed as dist

from tpshard.comm.collectives import Collectives
from tpshard.comm.process_group import ProcessGroupCollectives, lost_peer
from tpshard.comm.shm import SharedMemoryCollectives, ShmUnavailable, host_identity, shm_unavailable_reason
from tpshard.errors import TpshardError

KINDS = ("auto", "shm", "gloo")


def open_collectives(
    kind: str,
    setup: dist.ProcessGroup,
    steps: dist.ProcessGroup,
    rank: int,
    world_size: int,
    device: torch.device,
    poll: bool,
    group_ranks: list[int] | None = None,
) -> tuple[Collectives, str]:
    """The group's collectives and the name of what runs them ("shm", "gloo" or "nccl").

    setup: the group's ranks with a generous timeout (SETUP_TIMEOUT), used to agree and to set shm up;
    steps: the same ranks with STEP_TIMEOUT, for the process-group collectives; rank: the rank in
    them; group_ranks: their global ranks (None: the whole world); poll: every rank on this host has a
    CPU of its own. Every rank of the group calls this together."""
    if kind not in KINDS:
        raise TpshardError(f"--comm {kind}: choose one of {', '.join(KINDS)}")
    if kind != "gloo":
        reason = _group_reason(setup, rank, world_size, device, poll)
        if reason is None:
            try:
                return SharedMemoryCollectives(setup, rank, world_size, group_ranks), "shm"
            except ShmUnavailable as e:  # raised on every rank together: they all fall back
                reason = str(e)
        if kind == "shm":
            raise TpshardError(f"--comm shm: {reason}; use --comm gloo (or auto)")
    return ProcessGroupCollectives(steps, rank, world_size, device, poll), dist.get_backend(steps)


def _group_reason(setup: dist.ProcessGroup, rank: int, world_size: int, device: torch.device, poll: bool) -> str | None:
    """Why shm cannot serve the group, the same on every rank; None when it can."""
    device = torch.device(device)
    if device.type != "cpu":  # every rank of a run has the same device type: no need to ask (nor NCCL)
        return shm_unavailable_reason(device)
    mine, verdicts = (shm_unavailable_reason(device, world_size, poll), host_identity()), [None] * world_size
    try:
        dist.all_gather_object(verdicts, mine, group=setup)
    except RuntimeError as e:
        raise lost_peer(e) from None
    for r, (reason, _) in enumerate(verdicts):
        if reason is not None:
            return reason if r == rank else f"rank {r}: {reason}"
    return shm_unavailable_reason(device, world_size, poll, hosts=[host for _, host in verdicts])
