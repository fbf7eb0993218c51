"""Which device and how many threads a job gets, and the data-parallel (DDP) process group.

Device pool. When jobs run in parallel on one machine (``hydra/launcher=local``), the launcher
puts the machine's GPUs in a pool (``RESNORM_DEVICE_POOL``, e.g. ``0,1,2,3``) and each job takes
``train.devices`` of them *exclusively* for as long as it runs: one lock file per GPU and slot
(``<lock dir>/gpu<N>.slot<K>.lock``, :mod:`resnorm.runs.locks`), taken without blocking, the job waiting until
enough are free. A GPU has one slot, or N with ``hydra.launcher.jobs_per_device=N`` (packing,
:mod:`resnorm.sweep.packing`): slot K of GPU N is ``N/K`` in the pool (``0,1,0/1,1/1``: two GPUs, two
jobs each), and the N jobs holding its slots share the GPU. A job of ``train.devices`` > 1 takes
its slots on distinct GPUs. Unlike a round-robin on the job number, this stays exclusive when jobs
differ in length, and across sweeps run at the same time by the same user. The OS drops the locks of a killed job.
A pool of fake GPUs (``fake:0,fake:1``: the launcher's ``fake_gpus=N``) is scheduled the same way
but trains on the CPU: that is how the scheduling is tested on machines without GPUs.

Threads. ``train.threads`` if set, else 1, for each process of a job, under every launcher
(:func:`job_threads`): the thread count changes the last bits of a CPU run, so it is the config's,
not the launcher's. The ``local`` launcher sets ``OMP_NUM_THREADS`` (for the libraries other than
torch) to match and runs as many jobs at once as there are cores for them.

DDP. ``train.devices=N`` trains one model on N processes (spawned by the job, torchrun-style: one
per device, ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set): each takes its slice of the same global
batch, DistributedDataParallel averages the gradients (gloo on the CPU, NCCL on GPUs), so the run
follows the single-process run with the same ``train.batch_size``. The rendezvous is a TCPStore
held by the job's own process on a free port of 127.0.0.1 (one machine).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

POOL_ENV = "RESNORM_DEVICE_POOL"
THREADS_ENV = "RESNORM_THREADS"
LOCK_DIR_ENV = "RESNORM_LOCK_DIR"
FAKE = "fake:"


@contextlib.contextmanager
def environ(values: Dict[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the ``with`` block, then restore what was there."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask: what SLURM or taskset granted)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def job_threads(configured: Optional[int], world: int = 1) -> int:
    """Torch threads for each of the ``world`` processes of a job: ``train.threads``, else 1.

    Fixed by the config alone, never by the launcher, the environment or the number of cores: the
    last bits of a CPU run depend on the thread count, and a run (a resumed one too) must compute the
    same whichever launcher runs it and however many jobs are left."""
    return int(configured) if configured else 1


@dataclass(frozen=True)
class Slot:
    """One place of the pool: slot ``slot`` of a GPU, or of a fake GPU (which trains on the CPU)."""

    index: int
    fake: bool = False
    slot: int = 0  # which of the device's jobs_per_device places

    @property
    def device_name(self) -> str:
        return f"{FAKE}{self.index}" if self.fake else str(self.index)

    @property
    def name(self) -> str:
        return f"{self.device_name}/{self.slot}" if self.slot else self.device_name

    @property
    def device(self) -> str:
        return "cpu" if self.fake else f"cuda:{self.index}"

    @classmethod
    def parse(cls, text: str) -> "Slot":
        device, _, slot = text.strip().partition("/")
        fake = device.startswith(FAKE)
        return cls(int(device[len(FAKE):] if fake else device), fake=fake, slot=int(slot or 0))


def format_pool(slots: Sequence[Slot]) -> str:
    return ",".join(s.name for s in slots)


def packed(devices: Sequence[Slot], per_device: Sequence[int]) -> List[Slot]:
    """``per_device[i]`` slots of each device, slot by slot (``0,1,0/1,1/1``: jobs spread over the
    GPUs before they share one)."""
    most = max(per_device, default=0)
    return [Slot(d.index, d.fake, k) for k in range(most) for d, n in zip(devices, per_device) if k < n]


def pool_from_env() -> List[Slot]:
    text = os.environ.get(POOL_ENV, "").strip()
    return [Slot.parse(t) for t in text.split(",") if t.strip()] if text else []


def visible_gpus() -> List[int]:
    """Indices (as torch numbers them) of the GPUs this process sees; [] without CUDA."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def default_lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"resnorm-device-locks-{os.getuid()}")


class DevicePool:
    """Exclusive use of devices by the jobs of one machine, through one lock file per device."""

    def __init__(self, slots: Sequence[Slot], lock_dir: Optional[Path] = None, poll_s: float = 0.2):
        self.slots = list(slots)
        self.lock_dir = Path(lock_dir) if lock_dir else default_lock_dir()
        self.poll_s = poll_s

    def _lock_path(self, slot: Slot) -> Path:
        return self.lock_dir / f"{'fake' if slot.fake else 'gpu'}{slot.index}.slot{slot.slot}.lock"

    @contextlib.contextmanager
    def acquire(self, n: int = 1) -> Iterator[List[Slot]]:
        """Wait until ``n`` slots on distinct devices are free, hold them for the ``with`` block."""
        from resnorm.runs.locks import try_lock

        n_devices = len({(s.index, s.fake) for s in self.slots})
        if n > n_devices:
            raise RuntimeError(f"a job needs {n} devices but the pool has {n_devices}: "
                               f"{format_pool(self.slots) or 'none'}")
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        held: List[tuple] = []
        try:
            while True:
                for slot in self.slots:
                    if len(held) == n:
                        break
                    if any((h.index, h.fake) == (slot.index, slot.fake) for h, _ in held):
                        continue  # one slot per device and job: a DDP run's processes on distinct GPUs
                    fd = try_lock(self._lock_path(slot))
                    if fd is None:
                        continue
                    held.append((slot, fd))
                if len(held) == n:
                    break
                for _, fd in held:  # never sit on part of a request: two jobs could block each other
                    os.close(fd)
                held = []
                time.sleep(self.poll_s)
            yield [slot for slot, _ in held]
        finally:
            for _, fd in held:
                os.close(fd)  # closing drops the flock


@contextlib.contextmanager
def claim(device: str, n: int = 1) -> Iterator[Optional[List[Slot]]]:
    """Devices from the pool (``RESNORM_DEVICE_POOL``) for a job asking for ``train.device=device``;
    yields None (no pool, or the job named its device: ``cpu`` or ``cuda:N``)."""
    slots = pool_from_env()
    if not slots or device not in ("auto", "cuda"):
        yield None
        return
    with DevicePool(slots).acquire(n) as got:
        yield got


def job_device(name: str, rank: int = 0, slots: Optional[Sequence[Slot]] = None):
    """The torch device of process ``rank`` of a job: its pool slot, else ``train.device``."""
    import torch

    if slots:
        return torch.device(slots[rank].device)
    if name in ("auto", "cuda"):
        if not torch.cuda.is_available():
            if name == "cuda":
                raise RuntimeError("train.device=cuda but CUDA is not available on this machine")
            return torch.device("cpu")
        return torch.device("cuda", rank)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
        return torch.device("cuda", (device.index or 0) + rank)
    return device


# --- DDP -------------------------------------------------------------------------------------------

def backend_for(device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(rank, world, *args)


def spawn(fn: Callable, world: int, args: tuple = ()) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes; raise if any of them fails.

    ``fn`` calls :func:`init_process_group` with the device it trains on. The job's process holds
    the rendezvous store for the processes' lifetime.
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    try:
        with environ({"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}), _spawn_default():
            mp.start_processes(_worker, args=(world, store.port, fn, args), nprocs=world, join=True,
                               start_method="spawn")
    finally:
        del store


@contextlib.contextmanager
def _spawn_default() -> Iterator[None]:
    """Python's default start method set to spawn for the ``with`` block. A spawned child is told
    its parent's default and sets it first thing; in a worker of the local launcher that default is
    loky's, which a plain child does not know ("cannot find context for 'loky'")."""
    import multiprocessing

    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(before, force=True)


def init_process_group(rank: int, world: int, device) -> None:
    """Join the job's process group (a client of the store :func:`spawn` holds)."""
    import datetime

    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world + 1,
                          is_master=False, timeout=datetime.timedelta(minutes=5))
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world)


def data_parallel(model, device):
    """The model's loss, as a DistributedDataParallel module: ``ddp(x, y)`` returns the loss."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    class Loss(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, y):
            return self.inner.loss(x, y)

    return DistributedDataParallel(Loss(model), device_ids=[device.index] if device.type == "cuda" else None)


def grad_sync(step_model, skip: bool):
    """DDP's ``no_sync()`` of ``step_model`` (the DDP module of :func:`data_parallel`, compiled or
    not) when ``skip`` (a micro-batch before the step's last: its gradients accumulate locally and
    the last one's backward all-reduces them all); otherwise a context that does nothing."""
    if not skip:
        return contextlib.nullcontext()
    return getattr(step_model, "_orig_mod", step_model).no_sync()


def all_mean(tensor, world: int):
    """The mean of ``tensor`` over the processes of the group (in place)."""
    import torch.distributed as dist

    dist.all_reduce(tensor)
    return tensor.div_(world)
