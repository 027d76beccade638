"""Training on several processes with PyTorch's own engine (torchrun, DDP, FSDP2).

A process started by ``torchrun`` (or ``lmlab train --nproc-per-node N``) finds its place
in the environment torchrun sets: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``. :func:`setup` joins the process group (gloo on CPU, NCCL on CUDA) and
:func:`teardown` leaves it; without torchrun both do nothing and every helper here acts as
for a single process (rank 0 of 1), so the same training code runs either way.

Batches: every rank draws the whole global batch from the same seeded generator, then keeps
its own rows (:func:`shard_rows`), so N processes see exactly the examples one process sees
at each step. :func:`share_of_mean` weights a rank's mean loss so that averaging over ranks
(what DDP does to gradients) gives the mean over the whole global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (its rank variables are set)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def active() -> bool:
    """True when this process belongs to a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes the run directory."""
    return rank() == 0


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (``--max-restarts``); 0 otherwise."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def local_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda`` without an index means ``cuda:LOCAL_RANK`` under torchrun."""
    if device.type == "cuda" and device.index is None and launched_by_torchrun():
        return torch.device("cuda", local_rank())
    return device


def setup(device: torch.device | str = "cpu", timeout_s: float = 600.0) -> bool:
    """Join torchrun's process group (gloo for a CPU ``device``, NCCL for CUDA), once.

    Returns True when a group is in use. Without torchrun's variables nothing happens.
    ``timeout_s`` bounds how long a collective waits for a rank that stopped answering."""
    if not launched_by_torchrun() or dist.is_initialized():
        return dist.is_initialized()
    device = local_device(torch.device(device))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def teardown() -> None:
    """Leave the process group (when one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank reaches this point (nothing for one process)."""
    if active():
        dist.barrier()


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the ranks (float64), the same dict on every rank."""
    if not active() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def sum_across_ranks(value: float) -> float:
    """The sum of ``value`` over the ranks."""
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` (picklable, from this job's own processes), on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def gather_to_main(value: Any) -> list[Any] | None:
    """``[value of rank 0, value of rank 1, ...]`` on rank 0, None on the others."""
    if not active():
        return [value]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(value, out, dst=0)
    return out


def check_same_on_every_rank(value: str, what: str) -> None:
    """Raise a ValueError on every rank when ``value`` (e.g. a vocabulary as JSON) differs
    between the ranks: they would train on different things."""
    if not active():
        return
    import hashlib

    digests = [None] * world_size()
    dist.all_gather_object(digests, hashlib.sha256(value.encode("utf-8")).hexdigest())
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(f"{what} of rank(s) {', '.join(map(str, differ))} differ(s) from rank 0's; every process "
                         "must read the same data and options (on several machines: the same files at the same path)")


class RankFailedError(RuntimeError):
    """Raised on the other ranks when rank 0 failed in a step they all wait on."""


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and return its result on every rank. When it raises,
    rank 0 re-raises and every other rank raises :class:`RankFailedError` with its message,
    so no rank is left waiting."""
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - told to the others, then raised again
            error = e
    outcome = from_main(("error", f"{type(error).__name__}: {error}") if error is not None else ("ok", result))
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise RankFailedError(f"rank 0 failed: {outcome[1]}")
    return outcome[1]


def check_batch_size(batch_size: int) -> None:
    """A global batch must split into equal shares, one per rank."""
    n = world_size()
    if batch_size % n:
        raise ValueError(f"batch_size={batch_size} (the global batch) does not split evenly over {n} processes; "
                         f"use a multiple of {n}")


def shard_rows(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of a global batch x, y (B, T) -> (B / world_size, T): rank r keeps
    rows r*B/N .. (r+1)*B/N - 1, so the shares are disjoint and cover the batch."""
    n = world_size()
    if n == 1:
        return x, y
    share = x.shape[0] // n
    start = rank() * share
    return x[start:start + share], y[start:start + share]


def share_of_mean(y_local: torch.Tensor, y_global: torch.Tensor, ignore_index: int) -> float:
    """The factor turning this rank's mean loss (over its targets that are not ``ignore_index``)
    into its part of the global mean, scaled by world_size because DDP averages over ranks:
    N * (targets here) / (targets in the global batch). 1.0 for one process, and for every
    rank when all rows hold the same number of targets (windows of a stream)."""
    n = world_size()
    if n == 1:
        return 1.0
    total = int((y_global != ignore_index).sum())
    return n * int((y_local != ignore_index).sum()) / max(total, 1)


def full_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict whose sharded tensors (DTensor, from FSDP2) are gathered whole; every
    rank must call it (a collective), in the same order. Other values pass unchanged."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in state.items()}


def shard_like(full: torch.Tensor, reference: Any) -> Any:
    """``full`` placed like ``reference``: split the same way when ``reference`` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.device, reference.dtype), reference.device_mesh,
                                 reference.placements)
    return full


# ------------------------------------------------------------------ DDP and FSDP2


class Objective(torch.nn.Module):
    """A loss of one batch as a module around the model, so DDP or FSDP wraps the whole
    loss computation, whatever methods of the model it calls (an adaptive output layer's
    loss, a masked objective): ``objective(x, y, training) -> scalar``."""

    def __init__(self, model: torch.nn.Module, train_loss: Callable, eval_loss: Callable) -> None:
        super().__init__()
        self.model = model
        self._losses = (eval_loss, train_loss)

    def forward(self, x: torch.Tensor, y: torch.Tensor, training: bool = True) -> torch.Tensor:
        return self._losses[training](x, y)


def parallelize(model: torch.nn.Module, train_loss: Callable, eval_loss: Callable, device: torch.device,
                fsdp: bool = False, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``train_loss``/``eval_loss`` (x, y) -> scalar of ``model``, as an :class:`Objective`
    under DistributedDataParallel, or with ``fsdp`` under FSDP2 (``fully_shard`` on each of a
    transformer's blocks, then on the rest), computing in ``param_dtype`` (bfloat16) when given
    and reducing gradients in float32. Call it on every rank, after ``model`` is on ``device``."""
    objective = Objective(model, train_loss, eval_loss)
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(objective, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = getattr(model, "blocks", None)
    if getattr(model, "family", None) not in ("transformer", "masked-transformer") or blocks is None:
        raise ValueError(f"fsdp shards a transformer's blocks; the model family "
                         f"{getattr(model, 'family', type(model).__name__)!r} has none "
                         "(train it with DDP: leave out --fsdp)")
    policy = MixedPrecisionPolicy()
    if param_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    return fully_shard(objective, mp_policy=policy)


def is_sharded(module: torch.nn.Module | None) -> bool:
    """True for a module sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module | None, sync: bool):
    """Skip the all-reduce of gradients inside the block unless ``sync`` (DDP ``no_sync``,
    FSDP2 ``set_requires_gradient_sync``): for the micro-steps of an accumulation but the last.
    Run the backward pass inside it."""
    if module is None or sync:
        yield
    elif is_sharded(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        with module.no_sync():
            yield


# ------------------------------------------------------------------ launching


def without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the options ``names`` (each with one value: ``--name V`` or ``--name=V``)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in names:
            skip = True
        elif not item.startswith(tuple(f"{name}=" for name in names)):
            out.append(item)
    return out


def launch(nproc_per_node: int, module_argv: list[str], max_restarts: int = 0) -> None:
    """Run ``python -m <module_argv>`` in ``nproc_per_node`` processes on this machine under
    torchrun's elastic agent (``torch.distributed.run``, a free local port). A worker that
    fails stops the others; after ``max_restarts`` restarts the failure is raised as a
    ValueError naming the first rank that failed and why."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node {nproc_per_node} must be >= 1")
    if max_restarts < 0:
        raise ValueError(f"--max-restarts {max_restarts} must be >= 0")
    if max_restarts:  # restarted workers sharing the agent's store can read the last round's addresses
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # (pytorch/pytorch#135712)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}",
                        "--module", *module_argv]))
    except ChildFailedError as e:
        failed_rank, failure = e.get_first_failure()
        cause = (f"killed by {failure.signal_name()}" if failure.exitcode < 0
                 else f"exit code {failure.exitcode}")
        message = failure.message if isinstance(failure.message, str) and failure.message else ""
        if message and "Signal" not in message and "To enable traceback" not in message:
            cause += f": {message.splitlines()[0]}"
        raise ValueError(f"the distributed run stopped: rank {failed_rank} (pid {failure.pid}) failed, {cause}"
                         + (f", after {max_restarts} restart(s)" if max_restarts else "")) from None
