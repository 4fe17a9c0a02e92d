"""Training past one process, on PyTorch's own ``torch.distributed``, launched by ``torchrun``.

Every process reads the whole data set and cuts every global batch (``batch_size × gradient_accumulation_steps``
samples, the same windows as one process takes) into one contiguous share per process. Each process divides the
summed loss of its share by the target tokens of the whole window, and one all-reduce (a sum) of the adapter's
gradients gives every process the gradient one process would have computed over the whole window; each then takes
the same optimizer step. Dropout masks are keyed on the sample: each adapted layer gets, per sample, the seed
``hash(seed, step, sample index, layer index)`` (:func:`sample_seed`), so one process and N processes draw the same
masks, and a run resumed with another number of processes continues as it was.

Strategies: ``ddp`` keeps a whole model in every process; ``fsdp`` shards the frozen base weights across the
processes with FSDP2 (``torch.distributed.fsdp.fully_shard``, each decoder layer one unit), while the adapter's
parameters stay whole in every process and are all-reduced as under ``ddp``: checkpoints and the saved adapter are
then the same files whatever the strategy and the number of processes.

A process that fails writes its message into the job's store before it exits; the others, whose collective then
fails (or times out after ``distributed.timeout`` seconds), stop with that message.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import struct
import sys
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..errors import ConfigError, LispetorchError
from .config import TrainConfig

# (one per attempt: torchrun's agent keeps its store across the restarts of --max-restarts)
FAILURE_KEY = f"lispetorch/failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
DEFAULT_TIMEOUT = 600.0
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


class DistributedError(LispetorchError, RuntimeError):
    """Another process of the job failed (the message is its own), or a collective timed out."""


@dataclasses.dataclass
class World:
    """This process's place in the job: ``rank`` of ``size`` processes, and the strategy. ``active``: a process
    group is up (under ``torchrun``; False for a run of one process keyed as one). ``store``: the job's key-value
    store, where a failing process leaves its message (None where the process group was set up by the caller)."""

    rank: int = 0
    size: int = 1
    strategy: str = "ddp"
    active: bool = False
    store: object | None = None
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Whether this process writes: logs, plots, checkpoints and the adapter."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.size > 1


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting its environment)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def backend_for(device: torch.device) -> str:
    """The collective backend for ``device``: gloo on CPU, nccl on CUDA.

    Raises:
        ConfigError: no backend serves the device, or this torch was built without it."""
    name = BACKENDS.get(device.type)
    if name is None:
        raise ConfigError(f"device {device}: torch.distributed has no backend for it (gloo serves cpu, nccl cuda)")
    if not (dist.is_gloo_available() if name == "gloo" else dist.is_nccl_available()):
        raise ConfigError(f"device {device}: its backend {name} is not available in this torch build")
    return name


def config_digest(config: TrainConfig) -> bytes:
    """SHA-256 of the resolved config (every key, paths made absolute)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).digest()


def start(config: TrainConfig, device: torch.device, source: str = "config") -> tuple[World | None, torch.device]:
    """Joins the job this process belongs to: ``(None, device)`` for a plain run of one process; a world of one
    for a run of one process whose config has ``distributed``; under ``torchrun``, the process group (gloo on CPU,
    nccl on CUDA, each process on ``cuda:LOCAL_RANK``), after checking that every process has the same config.

    Raises:
        ConfigError: the world size does not divide the global batch, the device has no backend, or the processes
            were started with different configs (on every process).
    """
    section = config.distributed
    if not launched():
        return (None if section is None else World(strategy=section.strategy)), device
    size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    config.check_world_size(size, source)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = backend_for(device)
    timeout = datetime.timedelta(seconds=section.timeout if section is not None else DEFAULT_TIMEOUT)
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    owns, store = not dist.is_initialized(), None
    if owns:  # (a process group set up by the caller is used as it is)
        # torchrun's agent hosts the store at MASTER_ADDR:MASTER_PORT; another launcher leaves it to rank 0
        hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(host, port, size, is_master=rank == 0 and not hosted, timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore("lispetorch", store), rank=rank, world_size=size,
                                timeout=timeout, device_id=device if device.type == "cuda" else None)
    world = World(rank, size, section.strategy if section is not None else "ddp", True, store, owns)
    digests = gather_bytes(config_digest(config), device)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise ConfigError(f"{source}: the processes were started with different configs (the resolved config of "
                          f"rank {differing[0]} has checksum {digests[differing[0]].hex()[:16]}, rank 0's "
                          f"{digests[0].hex()[:16]}): start every process with the same config")
    return world, device


def gather_bytes(data: bytes, device: torch.device) -> list[bytes]:
    """Every process's ``data`` (all of the same length), by rank."""
    mine = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [bytes(t.cpu().tolist()) for t in out]


def finish(world: World | None) -> None:
    """Waits for every process (the adapter is written when any returns) and leaves the process group."""
    if world is not None and world.active:
        dist.barrier()
        if world.owns_group:
            dist.destroy_process_group()


# --- failures --------------------------------------------------------------------------------------------------
def on_failure(world: World | None, error: BaseException) -> DistributedError | None:
    """What a process that stops on ``error`` raises: when another process failed first (this one's collective
    broke or timed out because of it), a DistributedError with that process's message; else None (``error`` is this
    process's own, and is written into the store for the others to read)."""
    if world is None or world.store is None:
        return None
    other = _failure(world, wait=not isinstance(error, LispetorchError))
    if other is not None and not other.startswith(f"rank {world.rank}:"):
        return DistributedError(f"stopped because {other}")
    try:
        # the first failure stays: a process that fails later, because of it, does not overwrite it
        world.store.compare_set(FAILURE_KEY, "", f"rank {world.rank}: {type(error).__name__}: {error}")
    except Exception:  # the store's host is gone: the launcher stops the job anyway
        pass
    return None


def _failure(world: World, wait: bool) -> str | None:
    """The message of the first process that failed, if one did (waiting a little for it when ``wait``)."""
    store = world.store
    for _ in range(20 if wait else 1):
        try:
            if store.check([FAILURE_KEY]):
                return store.get(FAILURE_KEY).decode(errors="replace")
        except Exception:
            return None
        if wait:
            time.sleep(0.1)
    return None


# --- data ------------------------------------------------------------------------------------------------------
def share(items: Sequence, rank: int, size: int) -> list:
    """The ``rank``-th of ``size`` contiguous shares of ``items`` (their lengths differ by at most one)."""
    n = len(items)
    return list(items[n * rank // size:n * (rank + 1) // size])


def sample_seed(seed: int, step: int, sample: int, layer: int) -> int:
    """The dropout seed of ``sample`` (its index in the training set) in adapted layer ``layer`` at ``step``: a hash
    of the four, in [0, 2⁶²)."""
    digest = hashlib.blake2b(struct.pack("<4Q", seed, step, sample, layer), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


# --- collectives ---------------------------------------------------------------------------------------------
def all_reduce_gradients(params: Sequence[torch.nn.Parameter], extra: Sequence[float] = ()) -> list[float]:
    """Sums every parameter's gradient over the processes (one all-reduce per dtype); a gradient that no process
    has stays None, as it would in one process. Returns the sums of ``extra`` (in float64)."""
    device = params[0].device if params else torch.device("cpu")
    flags = torch.tensor([p.grad is not None for p in params] + list(extra), dtype=torch.float64, device=device)
    dist.all_reduce(flags)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p, flag in zip(params, flags[:len(params)].tolist(), strict=True):
        if flag:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
    return flags[len(params):].tolist()


def all_reduce_sums(values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` summed over the processes (in float64)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_parameters(params: Sequence[torch.nn.Parameter]) -> None:
    """Every process's ``params`` set to rank 0's (the adapter's init is seeded, this makes sure)."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, 0)


def agree(value: int, what: str, device: torch.device) -> None:
    """Raises DistributedError (on every process) unless every process holds the same ``value``."""
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise DistributedError(f"the processes disagree on {what}: from {-int(t[1])} to {int(t[0])}")


# --- sharding --------------------------------------------------------------------------------------------------
def shard_base(model: torch.nn.Module, trained: Sequence[torch.nn.Parameter], device: torch.device) -> int:
    """Shards ``model``'s frozen weights over the processes with FSDP2: each decoder layer (the model's
    ``_no_split_modules`` classes) one unit, the rest (embeddings, head, final norm) the root's. The ``trained``
    parameters are left whole in every process. Returns the number of units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ignored = set(trained)
    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params={p for p in unit.parameters() if p in ignored})
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return len(units) + 1


def _is_dtensor(t: torch.Tensor) -> bool:
    # torch.distributed.tensor takes a second or more to import: a plain run, which has no DTensor, never does
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t`` (its shard of a sharded tensor; ``t`` itself otherwise)."""
    return t.to_local() if _is_dtensor(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole (a sharded or partial tensor gathered, on every process at once; ``t`` itself otherwise)."""
    return t.full_tensor() if _is_dtensor(t) else t
