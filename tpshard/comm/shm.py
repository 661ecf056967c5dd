"""The collectives through shared memory, for the ranks of one group that all run on one host, on CPU.

Why here: gloo over loopback costs 0.6-1.4 ms a call on CPU, a decode step makes 2 * n_layer + 2 of
them, and an exchange through a shared mapping takes tens of µs. Nothing ready-made fits: PyTorch
ships no CPU shared-memory collective (gloo's landed in January 2026 and was reverted), DeepSpeed's
(deepspeed.comm's shm all-reduce) needs its compiled C++ op, and oneCCL / Intel Extension for PyTorch
are end-of-life. So this small piece is written here, in Python over torch tensors.

The segment: one anonymous file, made by rank 0 with memfd_create(2), mode 0600, mapped by every rank
of the group. It never has a name (not in /dev/shm, nowhere): the others open it through
/proc/<rank 0's pid>/fd/<n>, which the kernel opens only for processes allowed to inspect rank 0's
(the same user's), the mode then only for its owner, and they check a random 128-bit token rank 0 wrote
in it, so that no other run's segment can be taken for it. Two runs
never share one: each memfd_create makes a new file. Every rank closes its descriptor once every rank
has mapped the file; the memory lives as long as a mapping does, so it is freed when the last rank of
the group exits, however it exits, kill -9 included, and whenever it is killed (during set-up too:
there is no window between creating a name and removing it, since there is no name). /dev/shm is not
used at all (nor capped by its size, 64 MB in a default Docker container).

Layout, for N ranks and slots of S bytes (SLOT_BYTES, a multiple of 64):

    header (a page or more)   token, 16 bytes; rank r's flags at byte 128 + 128 r, each flag an
                              int64: seq (the last round r published), bytes[0], bytes[1] (the
                              length of r's piece in each buffer)
    slots                     slot (r, b) at HEADER + (2 r + b) S, for buffers b = 0, 1

The protocol. Every collective is made of rounds s = 1, 2, 3, ..., numbered across calls (every rank
runs the same collectives in the same order, on tensors of the same shapes, so every rank agrees on
s), and round s uses buffer b = s mod 2. In round s, rank r

    1. waits until seq[j] >= s - 1 for every rank j,
    2. writes its piece (at most S bytes) into slot (r, b) and its length into bytes[r][b],
    3. publishes seq[r] = s,
    4. waits until seq[j] >= s for every rank j whose piece it needs,
    5. reads slot (j, b) of those ranks.

Slot (r, b) is never overwritten before every rank has read it: it was last written in round s - 2,
and a rank j publishes seq[j] = s - 1 (step 3 of round s - 1) only after step 5 of round s - 2, so
step 1 holds rank r until every rank has finished reading round s - 2. With one buffer a rank could
overwrite round s while a slower one still reads it; with two, a fast rank runs at most one round
ahead (writing round s + 1 while the others read round s), which also pipelines long messages.

Messages longer than a slot are sent in several rounds of at most S bytes (fixed slots, rather than a
segment that grows: growing needs every rank to agree to remap, a second protocol, and fixed slots
keep the segment at 2 N S bytes, 4 MiB for two ranks). With S = 1 MiB a 25 MB prefill reduction takes
25 rounds: the few µs a round costs are small beside copying its MiB.

    reduce_partials   y = sum over r = 0 .. N-1 of partial_r, summed by rank_order_sum over the
                      [N, n] view of the N slots: the same operation, in the same order, as
                      ProcessGroupCollectives (all-gather, then rank_order_sum), bit-identical on every rank
    gather_logits     the N slots copied into their columns of [B, T, N * S_vocab], in rank order
    gather_piece      the owner writes the piece, every other rank reads slot (owner, b)
    reduce_piece      every rank writes its partial, the owner sums the N slots in rank order (as
                      reduce_partials); the others go on at once
    broadcast_token   rank 0 writes, every other rank reads slot (0, b); every rank still publishes
                      seq, which is what step 1 of rank 0's next round waits for

Memory ordering: this relies on x86-64's (TSO), which is why shm_unavailable_reason refuses any other
machine and callers fall back to gloo there:
    - stores are not reordered with other stores: whoever sees seq[r] = s sees the piece and the
      length rank r wrote before it (steps 2 then 3);
    - loads are not reordered with other loads: a rank that read seq[j] = s then reads round s's
      piece, not an older one (steps 4 then 5);
    - loads are not reordered with later stores: a rank's reads of round s - 2 (step 5) are done
      before its seq = s - 1 (step 3 of the next round) can be seen, and its reads of seq in step 1
      happen before its writes of step 2;
    - visibility is transitive (x86's causality), so the stores and loads made by torch's worker
      threads, which start and finish in step with the calling thread, are ordered like the calling
      thread's own;
    - the Python and torch calls run in program order and a CPU torch op has finished its stores when
      it returns; copies that use non-temporal stores end with an sfence (glibc's memcpy does), and
      torch releases and retakes the GIL around each op, a locked instruction, a full fence, anyway;
    - seq and bytes are aligned 8-byte words, read and written whole (memoryview of format "q"):
      such accesses are atomic on x86-64.

Waiting: a rank spins on the flags, yielding the CPU (os.sched_yield) between looks, and past
SLEEP_AFTER (2 ms: the peer is computing, not exchanging) sleeping 50 µs between looks. Measured on 2
cores with a decode-sized reduce_partials: with a core free per rank, spinning with and without
yielding both take 22 µs; under other processes' load, yielding took a steady 100 µs, spinning
without it 22-80 µs in most runs but 0.7-1.7 ms in one (while its peer waited for the core it took),
spinning 10 or 50 µs before yielding anything from 22 to 250 µs, and sleeping at once 70-170 µs. So
it yields at once, as ProcessGroupCollectives' polling does, and shm_unavailable_reason refuses hosts
with fewer CPUs than ranks, where spinning would take the cores the ranks compute on.

Failures: every wait has a deadline, STEP_TIMEOUT, and looks at the peers' processes every LOOK_EVERY
(5 ms) through pidfds, which, unlike pids, cannot be reused by another process: a peer that exited, or
one silent past the deadline, ends the wait with LostPeer naming it.
"""

import math
import mmap
import os
import platform
import select
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tpshard.comm.collectives import Collectives, Piece, rank_order_sum
from tpshard.comm.process_group import STEP_TIMEOUT, LostPeer, lost_peer
from tpshard.errors import TpshardError

SLOT_BYTES = 1 << 20  # one message piece; see the module docstring for why fixed
TOKEN_BYTES = 16
FLAGS_AT, FLAGS_STRIDE = 128, 128  # each rank's flags on cache lines of their own (and the prefetcher's pair)
LOOK_EVERY = 0.005  # seconds of waiting between two looks at the peers' processes
SLEEP_AFTER = 0.002  # seconds of waiting after which the spin sleeps between looks at the flags
SLEEP = 50e-6
MEMFD_NAME = "tpshard-shm"  # shown in /proc/<pid>/maps; it names nothing in any directory


class ShmUnavailable(TpshardError):
    """Set-up found that shared memory cannot serve this group; raised on every rank of it together."""


def shm_unavailable_reason(
    device: torch.device | str, world_size: int = 1, poll: bool = True, hosts: list[str] | None = None
) -> str | None:
    """Why this process cannot take part in shared-memory collectives, or None when it can.

    device: the run's device. world_size: ranks in the group. poll: whether every rank on this host
    has a CPU of its own (launch's poll), since waiting ranks spin. hosts: every rank's host_identity(),
    when known: shared memory needs one host, one PID namespace."""
    device = torch.device(device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device.type != "cpu":
        return f"the ranks run on {device.type}: shared-memory collectives carry CPU tensors"
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return (
            f"shared-memory collectives rely on Linux and x86-64's memory ordering; "
            f"this is {sys.platform} on {platform.machine()}"
        )
    if not (hasattr(os, "memfd_create") and hasattr(os, "pidfd_open") and Path("/proc/self/fd").is_dir()):
        return "shared-memory collectives need memfd_create, pidfd_open (Linux 5.3 or later) and /proc"
    if world_size > cpus or not poll:
        return f"more ranks on this host than its {cpus} CPUs: waiting ranks spin, and would take their cores"
    if hosts is not None and len(set(hosts)) > 1:
        return "the ranks are not all on one host (or not in one PID namespace)"
    return None


def host_identity() -> str:
    """Equal for two processes exactly when they share a kernel (boot id) and a PID namespace."""
    try:
        return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:  # no /proc: shm_unavailable_reason says no anyway; unlike any other process's
        return f"unknown, pid {os.getpid()}"


class SharedMemoryCollectives(Collectives):
    def __init__(
        self,
        setup: dist.ProcessGroup,
        rank: int,
        world_size: int,
        group_ranks: list[int] | None = None,
        *,
        slot_bytes: int = SLOT_BYTES,
        timeout: timedelta = STEP_TIMEOUT,
    ):
        """setup: a group of exactly these ranks (gloo, with a generous timeout), used only here, to
        exchange the segment and the pids; rank: this process's rank in it; group_ranks: their global
        ranks (None: the whole world), which name them in errors. Every rank of setup calls this
        together; it raises ShmUnavailable on every rank, or on none."""
        super().__init__()
        self.rank, self.world_size, self.seconds, self.received_bytes = rank, world_size, 0.0, 0
        self.names = [f"rank {g}" for g in (group_ranks if group_ranks is not None else range(world_size))]
        self.timeout = timeout.total_seconds()
        self.slot_bytes = max(64, slot_bytes // 64 * 64)  # every dtype's elements aligned in every slot
        self.header = -(-(FLAGS_AT + FLAGS_STRIDE * world_size) // mmap.PAGESIZE) * mmap.PAGESIZE
        self._map, pids = _open_segment(setup, rank, world_size, self.header + 2 * world_size * self.slot_bytes)
        self.token = bytes(self._map[:TOKEN_BYTES])  # the segment's identity, the same on every rank
        self._words = memoryview(self._map).cast("q")  # seq and bytes, read and written as whole 8-byte words
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._pidfds, self._exits = {}, select.poll()  # a pidfd is readable once its process has exited
        for j in (j for j in range(world_size) if j != rank):
            try:
                fd = os.pidfd_open(pids[j])  # not the pid: a pid can be reused, a pidfd names one process
            except ProcessLookupError:
                raise LostPeer(f"{self.names[j]} is gone: its process ended during set-up") from None
            self._pidfds[fd] = j
            self._exits.register(fd, select.POLLIN)
        self._round = 0  # the last round this rank took part in
        self._everyone = [j for j in range(world_size) if j != rank]
        self._all_at = 0  # every rank is known to have published this round
        self._views: dict[torch.dtype, list[torch.Tensor]] = {}  # per dtype, per buffer: [N, slot elements]

    # --- the patterns ---------------------------------------------------------------------------

    def reduce_partials(self, partials: torch.Tensor) -> torch.Tensor:
        begin = time.perf_counter()
        local = partials.reshape(partials.shape[0], -1)
        out = partials.new_empty(partials.shape[1:])
        flat = out.view(-1)
        per = self.slot_bytes // partials.element_size()
        for a in range(0, flat.numel(), per):
            n = min(per, flat.numel() - a)
            s = self._start_round()
            rank_order_sum(local[:, a : a + n], out=self._slot(self.rank, s, partials.dtype, (n,)))  # this rank's own
            self._publish(s, n * partials.element_size())
            self._wait_for(self._everyone, s, n * partials.element_size())
            rank_order_sum(self._slots(s, partials.dtype, (n,)), out=flat[a : a + n])  # as all-gather + sum
        self.seconds += time.perf_counter() - begin
        return out

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        begin = time.perf_counter()
        *lead, cols = local.shape
        rows = math.prod(lead)
        mine = local.reshape(rows, cols)
        out = local.new_empty((rows, self.world_size, cols))  # [B*T, N, S]: is [B, T, N*S]
        for r0, r1, c0, c1 in _pieces(rows, cols, self.slot_bytes // local.element_size()):
            shape, size = (r1 - r0, c1 - c0), (r1 - r0) * (c1 - c0) * local.element_size()
            s = self._start_round()
            self._slot(self.rank, s, local.dtype, shape).copy_(mine[r0:r1, c0:c1])
            self._publish(s, size)
            self._wait_for(self._everyone, s, size)
            out[r0:r1, :, c0:c1].copy_(self._slots(s, local.dtype, shape).transpose(0, 1))
        self.seconds += time.perf_counter() - begin
        return out.view(*lead, self.world_size * cols)

    def gather_piece(self, rows: torch.Tensor | None, piece: Piece, like: torch.Tensor) -> torch.Tensor:
        """Rounds in which the owner writes a slot of the piece and every other rank copies it."""
        assert rows is None or rows.dtype == like.dtype, "a piece in the dtype of the activations"
        begin = time.perf_counter()
        mine, dtype, item = piece.owner == self.rank, like.dtype, like.element_size()
        out = rows if mine else like.new_empty((like.size(0), piece.rows, *like.shape[2:]))
        assert out is not None, "the owner gives its rows"
        flat = out.reshape(-1)  # the owner's rows may be a strided view: read through a copy, never written
        per = self.slot_bytes // item
        for a in range(0, flat.numel(), per):
            n = min(per, flat.numel() - a)
            s = self._start_round()
            if mine:
                self._slot(self.rank, s, dtype, (n,)).copy_(flat[a : a + n])
            self._publish(s, n * item if mine else 0)
            if not mine:
                self._wait_for([piece.owner], s, n * item)
                flat[a : a + n].copy_(self._slot(piece.owner, s, dtype, (n,)))
        self.received_bytes += 0 if mine else out.nbytes
        self.seconds += time.perf_counter() - begin
        return out

    def reduce_piece(self, partials: torch.Tensor, piece: Piece, out: torch.Tensor | None) -> None:
        """Rounds in which every rank writes a slot of its partial and the owner sums the N slots in
        rank order, as reduce_partials does."""
        begin = time.perf_counter()
        dtype, item = partials.dtype, partials.element_size()
        mine = rank_order_sum(partials).reshape(-1)
        total = None if out is None else out if out.is_contiguous() else out.new_empty(out.shape)
        per = self.slot_bytes // item
        for a in range(0, mine.numel(), per):
            n = min(per, mine.numel() - a)
            s = self._start_round()
            self._slot(self.rank, s, dtype, (n,)).copy_(mine[a : a + n])
            self._publish(s, n * item)
            if total is not None:
                self._wait_for(self._everyone, s, n * item)
                rank_order_sum(self._slots(s, dtype, (n,)), out=total.view(-1)[a : a + n])
        if out is not None:
            if total is not out:
                out.copy_(total)
            self.received_bytes += (self.world_size - 1) * mine.numel() * item
        self.seconds += time.perf_counter() - begin

    def broadcast_token(self, token: torch.Tensor) -> torch.Tensor:
        """In place, as torch.distributed's broadcast: rank 0's token (any shape, at most a slot)."""
        begin = time.perf_counter()
        size = token.numel() * token.element_size()
        if size > self.slot_bytes:
            raise TpshardError(f"broadcast_token: {size} bytes, more than a slot ({self.slot_bytes})")
        s = self._start_round()
        if self.rank == 0:
            self._slot(0, s, token.dtype, token.shape).copy_(token)
        self._publish(s, size if self.rank == 0 else 0)
        if self.rank != 0:
            self._wait_for([0], s, size)
            token.copy_(self._slot(0, s, token.dtype, token.shape))
        self.seconds += time.perf_counter() - begin
        return token

    def close(self) -> None:
        """Unmap the segment and close the pidfds (an exit does both)."""
        for fd in self._pidfds:
            os.close(fd)
        self._pidfds, self._views = {}, {}
        del self._bytes  # torch holds no buffer export: no tensor may outlive the mapping
        self._words.release()
        self._map.close()

    # --- the protocol's steps (the module docstring numbers them) --------------------------------------

    def _start_round(self) -> int:
        """Step 1: the next round's number, once every rank has finished reading round s - 2."""
        s = self._round + 1
        if self._all_at < s - 1:
            self._wait_for(self._everyone, s - 1, None)
        self._round = s
        return s

    def _publish(self, s: int, size: int) -> None:
        """Step 3: the length first, then seq, the word the others wait on (stores stay in order)."""
        at = (FLAGS_AT + FLAGS_STRIDE * self.rank) // 8
        self._words[at + 1 + s % 2] = size  # per buffer: a rank one round ahead has written the other one
        self._words[at] = s

    def _wait_for(self, ranks: list[int], s: int, size: int | None) -> None:
        """Step 4: until every rank of ranks has published round s (and, when size is given, a piece of
        that many bytes: ranks out of step would otherwise read each other's garbage)."""
        for j in ranks:
            at = (FLAGS_AT + FLAGS_STRIDE * j) // 8
            if self._words[at] < s:
                self._spin(j, at, s)
            if size is not None and self._words[at + 1 + s % 2] != size:
                raise TpshardError(
                    f"{self.names[j]} sent {self._words[at + 1 + s % 2]} bytes where {self.names[self.rank]} expected "
                    f"{size}: the ranks are out of step"
                )
        if ranks is self._everyone:
            self._all_at = s

    def _spin(self, j: int, at: int, s: int) -> None:
        """Until rank j publishes round s (its seq word at index at), or LostPeer."""
        start = time.monotonic()
        look, deadline = start + LOOK_EVERY, start + self.timeout
        words = self._words
        while words[at] < s:
            now = time.monotonic()
            if now >= look:
                self._look(j, now >= deadline)
                look = now + LOOK_EVERY
            if now - start < SLEEP_AFTER:
                os.sched_yield()  # a core of its own (shm_unavailable_reason): returns at once unless needed
            else:
                time.sleep(SLEEP)  # a long wait: the peer is computing, a few tens of µs late are nothing

    def _look(self, j: int, late: bool) -> None:
        """A peer that has exited, or (late) rank j silent past the deadline: LostPeer."""
        gone = sorted(self._pidfds[fd] for fd, _ in self._exits.poll(0))
        if gone:
            names = ", ".join(self.names[k] for k in gone)
            raise LostPeer(f"{names} {'is' if len(gone) == 1 else 'are'} gone: its process ended during a collective")
        if late:
            raise LostPeer(f"no answer from {self.names[j]} in {self.timeout:g} s: it is stuck")

    def _slot(self, r: int, s: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Slot (r, s mod 2) as a tensor of that dtype and shape (at most slot_bytes)."""
        return self._slots(s, dtype, shape)[r]

    def _slots(self, s: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Every rank's slot of round s, stacked: [N, *shape], a view of the segment."""
        stacked = self._views.get(dtype)
        if stacked is None:  # made once per dtype: views cost µs, a round should cost few
            item, per = dtype.itemsize, self.slot_bytes // dtype.itemsize
            typed = self._bytes.view(dtype)
            stacked = [
                typed.as_strided((self.world_size, per), (2 * per, 1), (self.header + b * self.slot_bytes) // item)
                for b in (0, 1)
            ]
            self._views[dtype] = stacked
        return stacked[s % 2][:, : math.prod(shape)].view(self.world_size, *shape)


def _pieces(rows: int, cols: int, per: int):
    """A [rows, cols] message in pieces of at most per elements: whole rows when a row fits, else
    parts of one row. Yields (r0, r1, c0, c1)."""
    if cols <= per:
        step = per // max(cols, 1)
        for r0 in range(0, rows, step):
            yield r0, min(rows, r0 + step), 0, cols
    else:
        for r in range(rows):
            for c0 in range(0, cols, per):
                yield r, r + 1, c0, min(cols, c0 + per)


# --- set-up ---------------------------------------------------------------------------------------------


def _open_segment(setup: dist.ProcessGroup, rank: int, world_size: int, size: int) -> tuple[mmap.mmap, list[int]]:
    """Rank 0 makes the segment, every other rank maps it; returns the mapping and every rank's pid.
    Raises ShmUnavailable on every rank together when any rank cannot take part (each step's outcome
    is gathered: every rank decides from the same lists)."""
    fd, mapping, problem = None, None, None
    try:
        if rank == 0:
            fd, mapping, problem = _create(size)
        token = bytes(mapping[:TOKEN_BYTES]) if mapping is not None else None
        offers = _all_gather(setup, world_size, (os.getpid(), host_identity(), fd, token, problem))
        pids, hosts = [o[0] for o in offers], [o[1] for o in offers]
        if len(set(hosts)) > 1:
            raise ShmUnavailable("the ranks are not all on one host (or not in one PID namespace)")
        if offers[0][4]:
            raise ShmUnavailable(f"rank 0 could not make the shared memory: {offers[0][4]}")
        if rank != 0:
            mapping, problem = _attach(pids[0], offers[0][2], offers[0][3], size)
        problems = _all_gather(setup, world_size, problem)  # rank 0 holds its fd open until every rank mapped
        failed = [(r, p) for r, p in enumerate(problems) if p]
        if failed:
            raise ShmUnavailable(f"rank {failed[0][0]} could not map rank 0's shared memory: {failed[0][1]}")
        return mapping, pids
    except BaseException:
        if mapping is not None:
            mapping.close()
        raise
    finally:
        if fd is not None:
            os.close(fd)  # the mappings keep the memory until every rank has exited


def _create(size: int) -> tuple[int | None, mmap.mmap | None, str | None]:
    """Rank 0: the segment, anonymous, mapped, with a fresh token; (fd, mapping, None), or why not."""
    fd = None
    try:
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)  # anonymous: there is nothing to unlink, ever
        os.fchmod(fd, 0o600)  # its owner only (and /proc/<pid>/fd opens only for the same user's processes)
        os.ftruncate(fd, size)
        mapping = _map(fd, size)
    except OSError as e:
        if fd is not None:
            os.close(fd)
        return None, None, f"{e.strerror} ({size} bytes)"
    mapping[:TOKEN_BYTES] = os.urandom(TOKEN_BYTES)
    return fd, mapping, None


def _attach(pid: int, fd: int, token: bytes, size: int) -> tuple[mmap.mmap | None, str | None]:
    """Map rank 0's segment through /proc; (mapping, None), or (None, why not)."""
    path = f"/proc/{pid}/fd/{fd}"
    try:
        own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return None, f"{path}: {e.strerror}"
    try:
        if os.fstat(own).st_size != size:
            return None, f"{path} is not the segment (its size differs)"
        mapping = _map(own, size)
    except OSError as e:
        return None, f"{path}: {e.strerror}"
    finally:
        os.close(own)
    if mapping[:TOKEN_BYTES] != token:
        mapping.close()
        return None, f"{path} is not the segment (its token differs)"
    return mapping, None


def _map(fd: int, size: int) -> mmap.mmap:
    # MAP_POPULATE: the pages are faulted in now, not during the first collectives
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _all_gather(setup: dist.ProcessGroup, world_size: int, obj: object) -> list:
    """Every rank's obj in rank order; all_gather_object takes no source rank, so subgroups need no
    global ranks."""
    out = [None] * world_size
    try:
        dist.all_gather_object(out, obj, group=setup)
    except RuntimeError as e:
        raise lost_peer(e) from None
    return out
