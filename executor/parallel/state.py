"""The tensor-parallel process group.

One process per GPU; the whole world is one tensor-parallel group (rank 0 drives the core).
``init_tensor_parallel()`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), pins ``cuda:LOCAL_RANK`` on a GPU host,
initialises ``nccl`` (CUDA) or ``gloo`` (CPU) and a second ``gloo`` group for the control
plane (pickled scheduler outputs travel over TCP, never through the GPU), and makes the group
current: ``current_tp_group()`` is what ``create_engine`` / ``LLM`` pick up when no explicit
``tensor_parallel_size`` is given.
"""
from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

#: Workers wait for rank 0 between steps (an idle online run can sleep for minutes).
DEFAULT_TIMEOUT = datetime.timedelta(hours=6)

#: Multicast / NVLS stays off on the lent machines (see KINDS.md); the launcher forces these.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class TPGroup:
    """This process's view of the tensor-parallel group.

    ``group`` carries the model's collectives (nccl on CUDA, gloo on CPU); ``cpu_group`` is
    gloo, for objects (``broadcast_object``) and small host-side agreements (``min_int``).
    ``group=None`` with ``world_size == 1`` is a valid degenerate group (no communication).
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None
    cpu_group: Any = None
    backend: str = "none"
    local_rank: int = 0
    _buf: torch.Tensor | None = field(default=None, repr=False)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # --- model collectives --------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (capturable in a CUDA graph with nccl)."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [N, C] on every rank -> [N, world_size * C], rank r's columns at r*C."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        n, c = x.shape
        out = torch.empty(self.world_size * n, c, dtype=x.dtype, device=x.device)
        _all_gather_single(out, x, group=self.group)
        return out.view(self.world_size, n, c).permute(1, 0, 2).reshape(n, self.world_size * c)

    # --- control plane ------------------------------------------------------------------
    def min_int(self, value: int) -> int:
        """The minimum of ``value`` over ranks (e.g. the KV blocks every rank can hold)."""
        if self.world_size == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (pickle over the gloo group).

        One broadcast of a fixed-size buffer (length prefix + payload) when the payload fits,
        a second one for the rest when it does not; the buffer grows to the largest seen.
        """
        if self.world_size == 1:
            return obj
        if self._buf is None:
            self._buf = torch.empty(1 << 16, dtype=torch.uint8)
        buf = self._buf
        cap = buf.numel() - 8
        if self.rank == 0:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            n = len(data)
            buf[:8] = torch.frombuffer(bytearray(n.to_bytes(8, "little")), dtype=torch.uint8)
            head = min(n, cap)
            if head:
                buf[8:8 + head] = torch.frombuffer(bytearray(data[:head]), dtype=torch.uint8)
            dist.broadcast(buf, src=0, group=self.cpu_group)
            if n > cap:
                rest = torch.frombuffer(bytearray(data[cap:]), dtype=torch.uint8)
                dist.broadcast(rest, src=0, group=self.cpu_group)
                self._grow(n)
            return obj
        dist.broadcast(buf, src=0, group=self.cpu_group)
        n = int.from_bytes(bytes(buf[:8].tolist()), "little")
        data = buf[8:8 + min(n, cap)].numpy().tobytes()
        if n > cap:
            rest = torch.empty(n - cap, dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.cpu_group)
            data += rest.numpy().tobytes()
            self._grow(n)
        return pickle.loads(data)

    def _grow(self, n: int) -> None:
        size = 1 << max(16, (n + 8 - 1).bit_length())
        self._buf = torch.empty(size, dtype=torch.uint8)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)


# ``all_gather_into_tensor`` was renamed ``all_gather_single`` (torch 2.13 warns on the old name).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_current: TPGroup | None = None


def current_tp_group() -> TPGroup | None:
    """The group ``init_tensor_parallel`` set up in this process, or None."""
    return _current


def set_current_tp_group(group: TPGroup | None) -> None:
    global _current
    _current = group


def init_tensor_parallel(backend: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> TPGroup:
    """Join the world described by torchrun's environment variables and make it the
    current tensor-parallel group. ``backend``: ``nccl`` when CUDA is available, else ``gloo``.
    """
    global _current
    if _current is not None:
        return _current
    for key, value in NO_MULTICAST_ENV.items():
        os.environ[key] = value
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"rank {rank}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local_rank)
    if world == 1:
        _current = TPGroup(rank=0, world_size=1, backend=backend, local_rank=local_rank)
        return _current
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout, **kwargs)
    group = dist.group.WORLD
    # Control plane: gloo. A gloo world uses its own group for it (one group, one op order).
    cpu_group = group if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    _current = TPGroup(rank=rank, world_size=world, group=group, cpu_group=cpu_group, backend=backend,
                       local_rank=local_rank)
    return _current


def destroy_tensor_parallel() -> None:
    """Forget the current group and destroy the process groups (the launcher does not call
    this: it leaves with ``os._exit`` once every rank is done, see ``launch._hard_exit``)."""
    global _current
    _current = None
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_tp_group(tensor_parallel_size: int | None) -> TPGroup | None:
    """The group an engine should shard over: None for a single-process engine.

    ``None``: the current group if this process was started by the launcher (or torchrun) with
    more than one rank, else single-process. An explicit size must match the current group.
    """
    group = _current
    if tensor_parallel_size is None:
        return group if group is not None and group.world_size > 1 else None
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if tensor_parallel_size == 1:  # a single-process engine (on rank 0 of a launch: the others idle)
        return None
    if group is None or group.world_size != tensor_parallel_size:
        have = 1 if group is None else group.world_size
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs that many processes: start with "
                         f"`python -m executor.parallel.launch --tp {tensor_parallel_size} -- ...` or torchrun "
                         f"(this process sees a world of {have})")
    return group
