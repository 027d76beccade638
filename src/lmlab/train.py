"""A plain training loop: AdamW, warmup + cosine, clipping, accumulation,
periodic evaluation, best/last checkpoints, exact resume, JSON-lines metrics.

A run lives in its own directory::

    run/
      metrics.jsonl        one JSON object per logged step or evaluation, written as logged
      loss.png             train and validation loss curves
      settings.json        the options the run was started with (written by `lmlab train`)
      .lock                held (fcntl.flock) by the one process training in the directory
                           (rank 0 when several train together: it alone writes the directory)
      best/  last/         checkpoints: config.json, model.safetensors, tokenizer.json,
                           optimizer.safetensors, rng.safetensors, trainer.json (step, config;
                           written last, so a checkpoint holding it is complete)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmlab import distributed
from lmlab.data import IGNORE
from lmlab.hardware import PeakFlops, autocast_dtype, peak_flops
from lmlab.models.base import (
    LanguageModel,
    atomic_write_bytes,
    atomic_write_text,
    directory_identity,
    load_model,
    save_model,
    staged_directory,
)
from lmlab.rundir import (
    COMPLETE_MARK,
    LOCK_FILE,
    METRICS_FILE,
    SETTINGS_FILE,
    MetricsLog,
    RunDirectoryError,
    RunLock,
    recover_run,
    truncate_metrics,
)
from lmlab.models.heads import next_token_loss
from lmlab.throughput import ThroughputMeter

CHANGEABLE_ON_RESUME = ("max_iters", "time_budget", "device", "compile", "progress", "fsdp", "peak_flops")
"""TrainConfig fields a resumed run may change; every other field must equal the run's own."""


class Batches(Protocol):
    def sample(self, generator: torch.Generator, device: Any) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TrainConfig:
    max_iters: int = 2000
    batch_size: int = 12                # the global batch: split over the processes of a distributed run
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None   # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0              # 0 disables clipping
    grad_accum: int = 1
    eval_interval: int = 250
    eval_iters: int = 100               # random batches per split for the periodic estimate
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"                # "auto" | "cpu" | "cuda" | "cuda:1" ...
    dtype: str = "auto"                 # "auto" (bf16 autocast on CUDA and on CPUs with native bf16, else fp32) | "float32" | "bfloat16"
    compile: bool = False               # torch.compile the model's training forward (CPU or CUDA)
    peak_flops: float | None = None     # one device's peak FLOP/s for MFU; None: lmlab.hardware's estimate
    fsdp: bool = False                  # under torchrun: shard a transformer with FSDP2 instead of DDP
    time_budget: float | None = None    # stop after this many seconds of training
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not (self.lr > 0 and self.min_lr >= 0):
            raise ValueError(f"lr={self.lr} must be > 0 and min_lr={self.min_lr} >= 0")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}; accepted: 'auto', 'float32', 'bfloat16'")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(device)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``lr_decay_iters``."""
    decay_iters = config.lr_decay_iters or config.max_iters
    if step < config.warmup_iters:
        return config.lr * (step + 1) / (config.warmup_iters + 1)
    if step > decay_iters:
        return config.min_lr
    ratio = (step - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (config.lr - config.min_lr)


def lm_loss(model: LanguageModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets that are not IGNORE. x, y: (B, T).

    A model with an adaptive softmax output layer is trained through its adaptive
    loss (the same value, computed on each target's cluster only)."""
    return next_token_loss(model, x, y)[0]


def masked_lm_loss(model: LanguageModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BERT's masked-LM objective on the input windows x (B, T); y is not used.

    Each position is chosen with probability ``model.config.mask_prob`` (at least one
    per row); a chosen position is shown as the mask token 80% of the time, a random
    token 10%, itself 10%, and the loss is the mean cross-entropy of the original
    tokens at the chosen positions. Randomness comes from torch's global RNG, which
    the Trainer checkpoints, so resumed runs stay exact.
    """
    B, T = x.shape
    chosen = torch.rand(B, T, device=x.device) < model.config.mask_prob
    forced = torch.randint(0, T, (B,), device=x.device)
    chosen[torch.arange(B, device=x.device), forced] = True
    action = torch.rand(B, T, device=x.device)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(x, model.mask_id), x)
    random_ids = torch.randint(0, model.vocab_size, x.shape, device=x.device)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    logits, _ = model(inputs)
    return F.cross_entropy(logits[chosen].float(), x[chosen])


def objective_loss(model: LanguageModel):
    """The training loss a model family is made for: next-token or masked-token prediction."""
    return masked_lm_loss if getattr(model, "objective", "causal") == "masked" else lm_loss


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device,
                   fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms). ``fused`` (one kernel for
    every parameter's update) defaults to True on CPU and CUDA: on a CPU it makes the step
    about 2 ms faster (1 thread, 1.2 against 3.3 ms) than the multi-tensor ``foreach`` path on a 0.8M-parameter
    model, with the same updates to float32 rounding. Its CPU kernel writes the parameters
    without bumping their version counters (``p._version``), so nothing may cache values
    derived from weights keyed on those counters (an inference-time copy of concatenated
    q/k/v weights once did, and evaluation read stale weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused,
                             foreach=None if fused else True)


class Trainer:
    """Trains ``model`` on ``train`` batches, evaluates on ``val``, checkpoints into ``run_dir``.

    ``run_dir`` must not exist (or be empty) unless ``resume=True``, in which case training
    continues exactly from the run's newest complete checkpoint (``last/``, or ``best/``
    or a swap a kill left half done: see :func:`lmlab.rundir.recover_run`); ``config`` must
    equal the run's except the fields in :data:`CHANGEABLE_ON_RESUME`.
    ``loss_fn(model, x, y) -> scalar`` is the loss of one batch, for training and
    evaluation alike (default: the model's own objective, see :func:`objective_loss`);
    subclasses may override :meth:`train_loss` to train on something other than what they
    report. ``settings`` (JSON values) is saved as ``run_dir/settings.json`` for a later
    resume to restore (the ``lmlab train`` options).

    The trainer holds the run directory's lock (:class:`lmlab.rundir.RunLock`) from
    construction until :meth:`fit` returns or :meth:`close` is called. A write the disk
    refuses (full, read-only, the directory deleted) raises
    :class:`lmlab.rundir.RunDirectoryError` naming the path, and what was written stays intact.

    In a process group of N > 1 processes (torchrun, :func:`lmlab.distributed.setup`) the
    model trains under DistributedDataParallel, or FSDP2 with ``config.fsdp``: each rank
    takes its share of every global batch of ``config.batch_size`` rows, metrics are averaged
    over the ranks, and rank 0 alone holds the lock and writes the run directory.
    """

    def __init__(
        self,
        model: LanguageModel,
        train: Batches,
        val: Batches | None,
        config: TrainConfig,
        run_dir: str | Path,
        tokenizer: Any = None,
        resume: bool = False,
        loss_fn: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        for name, batches in (("train", train), ("val", val)):
            size = getattr(batches, "batch_size", config.batch_size)
            if size != config.batch_size:
                raise ValueError(f"the {name} batches hold {size} rows but config.batch_size={config.batch_size}; "
                                 "build both with the same batch size (the run directory records the config's)")
        distributed.check_batch_size(config.batch_size)
        self.config = config
        self.loss_fn = loss_fn or objective_loss(model)
        self.run_dir = Path(run_dir)
        self.device = distributed.local_device(resolve_device(config.device))
        self.rank = distributed.rank()
        self.is_main = self.rank == 0
        self.precision, self.precision_reason = autocast_dtype(config.dtype, self.device)
        self.peak = peak_flops(self.device, self.precision, config.peak_flops)
        self.train_batches, self.val_batches = train, val
        self.tokenizer = tokenizer
        self.step = 0
        self.best_val = float("inf")
        self.best_step = -1
        self.elapsed = 0.0
        self.checkpoint_step: int | None = None  # the step of the newest checkpoint on disk
        self._evaluated_step: int | None = None  # the step of the last evaluation logged
        self._lock = RunLock(self.run_dir)
        resume_from = distributed.on_main(lambda: self._open_run_directory(resume))
        try:
            self.model = model.to(self.device)
            self.parallel = None  # the loss under DDP or FSDP, when several processes train
            if distributed.active():
                self.parallel = distributed.parallelize(self.model, self.train_loss, self.eval_loss, self.device,
                                                        fsdp=config.fsdp, param_dtype=self._mixed_dtype())
            self.optimizer = make_optimizer(self.model, config, self.device)
            self.generator = torch.Generator().manual_seed(config.seed)  # the same global batches on every rank
            torch.manual_seed(config.seed + self.rank)  # dropout: a stream of its own per rank
            if resume_from is not None:
                self._load_checkpoint(resume_from)
            if self.is_main:
                self._prepare_run_files(resume_from is not None, settings)
            distributed.barrier()
        except BaseException:
            self.close()
            raise
        self.forward_model = torch.compile(self.model) if config.compile else self.model

    def _prepare_run_files(self, resumed: bool, settings: dict[str, Any] | None) -> None:
        if resumed:
            with self._writing(self.run_dir / METRICS_FILE):
                truncate_metrics(self.run_dir / METRICS_FILE, self.step)
        if settings is not None:
            with self._writing(self.run_dir / SETTINGS_FILE):
                atomic_write_text(self.run_dir / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")

    # ---------------------------------------------------------- several processes

    def _batch_loss(self, batches: Batches, generator: torch.Generator, training: bool,
                    meter: ThroughputMeter | None = None) -> tuple[torch.Tensor, int]:
        """(this rank's part of the mean loss of one global batch, its number of targets).

        Every rank draws the whole batch from ``generator`` and keeps its own rows; its
        mean loss is weighted by its share of the targets, so averaging over ranks gives the
        mean over the global batch (for one process: the batch's mean loss, unweighted).
        ``meter`` counts the global batch (every rank sees it, so no communication)."""
        x, y = batches.sample(generator, self.device)
        if meter is not None:
            meter.count(x)
        x_local, y_local = distributed.shard_rows(x, y)
        weight = distributed.share_of_mean(y_local, y, IGNORE)
        with self.autocast():
            if self.parallel is not None:
                loss = self.parallel(x_local, y_local, training)
            else:
                loss = self.train_loss(x_local, y_local) if training else self.eval_loss(x_local, y_local)
        return (loss if weight == 1.0 else loss * weight), int((y_local != IGNORE).sum())

    # ---------------------------------------------------------- the run directory

    def _open_run_directory(self, resume: bool) -> Path | None:
        """Create or check ``run_dir``, take its lock; on resume, recover and return the
        checkpoint to continue from."""
        run_dir = self.run_dir
        if not resume and run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            if (run_dir / LOCK_FILE).exists():
                with self._writing(run_dir / LOCK_FILE, check=False):
                    self._lock.acquire()  # a run in progress: name its process rather than the directory
                self._lock.release()
            raise FileExistsError(
                f"run directory {str(run_dir)!r} already exists; pass resume=True (--resume) "
                "to continue it, or choose a new directory"
            )
        if resume and not run_dir.is_dir():
            raise FileNotFoundError(f"cannot resume: no run directory at {str(run_dir)!r}")
        with self._writing(run_dir, check=False):
            run_dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        self._run_dir_identity = directory_identity(run_dir)
        if not resume:
            return None
        try:
            with self._writing(run_dir):
                checkpoint = recover_run(run_dir)
            if checkpoint is None:
                raise FileNotFoundError(
                    f"cannot resume {str(run_dir)!r}: it holds no complete checkpoint "
                    f"(last/ or best/ with {COMPLETE_MARK}); start a new run directory"
                )
        except BaseException:
            self.close()
            raise
        return checkpoint

    def close(self) -> None:
        """Release the run directory's lock (fit() does it when it returns)."""
        self._lock.release()

    def _check_run_dir(self) -> None:
        """Refuse to write once the run directory was deleted (or replaced by another)."""
        if directory_identity(self.run_dir, missing_ok=True) != self._run_dir_identity:
            raise RunDirectoryError(
                f"run directory {str(self.run_dir)!r} was deleted or replaced while training (step {self.step}); "
                "stopped without writing to it"
            )

    @contextlib.contextmanager
    def _writing(self, target: Path, check: bool = True):
        """Writes to ``target`` in the run directory: an OSError becomes a one-line RunDirectoryError.
        (Ranks other than 0 write nothing and check nothing.)"""
        if check and self.is_main:
            self._check_run_dir()
        try:
            yield
        except RunDirectoryError:
            raise
        except OSError as e:
            kept = ("no checkpoint was written yet" if self.checkpoint_step is None
                    else f"its checkpoints (newest: step {self.checkpoint_step}) and metrics are intact")
            raise RunDirectoryError(
                f"cannot write {e.filename or target}: {e.strerror or e}; {kept} in {str(self.run_dir)!r}"
            ) from e

    # ---------------------------------------------------------- evaluation

    def _mixed_dtype(self) -> torch.dtype | None:
        """bfloat16 when the config asks for it, or by default where the device has it
        (:func:`lmlab.hardware.autocast_dtype`); None: full precision."""
        return torch.bfloat16 if self.precision == torch.bfloat16 else None

    def autocast(self):
        if self._mixed_dtype() is torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss the optimizer descends, for one batch."""
        return self.loss_fn(self.forward_model, x, y)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss reported for evaluation, for one batch (the model as it is: only the
        training forward is compiled, so evaluating costs no second compilation)."""
        return self.loss_fn(self.model, x, y)

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over ``eval_iters`` random batches of each split (fixed seed: same batches,
        and the same random masks for a masked objective, each time; the training RNG is untouched).
        Several processes split each batch as in training and average their results."""
        self.model.eval()
        out = {}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(12345)
            for split, batches in (("train", self.train_batches), ("val", self.val_batches)):
                if batches is None:
                    continue
                gen = torch.Generator().manual_seed(12345)
                losses = [self._batch_loss(batches, gen, training=False)[0].item() for _ in range(self.config.eval_iters)]
                out[split] = sum(losses) / len(losses)
        self.model.train()
        return distributed.mean_across_ranks(out)

    # ---------------------------------------------------------- loop

    def fit(self) -> dict[str, Any]:
        """Train to ``max_iters`` (or the time budget); return a summary."""
        try:
            if self.is_main and not self._lock.held:
                with self._writing(self.run_dir):
                    self._lock.acquire()
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict[str, Any]:
        c = self.config
        self.model.train()
        metrics = None
        if self.is_main:
            with self._writing(self.run_dir / METRICS_FILE):
                metrics = MetricsLog(self.run_dir / METRICS_FILE)
        bar = tqdm(total=c.max_iters, initial=self.step, disable=not (c.progress and self.is_main), desc="train",
                   dynamic_ncols=True)
        tokens = 0
        world = distributed.world_size()
        meter = ThroughputMeter(self.model, self.peak if world == 1 or self.peak.flops is None else
                                PeakFlops(self.peak.flops * world, f"{self.peak.source}, x {world} processes"))
        t0 = time.perf_counter() - self.elapsed
        stop_reason = "max_iters"
        try:
            while self.step < c.max_iters:
                if self.step % c.eval_interval == 0 and self.step != self._evaluated_step:
                    with meter.paused():
                        self._evaluate(metrics, time.perf_counter() - t0)
                lr = learning_rate(self.step, c)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for micro in range(c.grad_accum):
                    with distributed.gradient_sync(self.parallel, micro == c.grad_accum - 1):
                        loss, targets = self._batch_loss(self.train_batches, self.generator, training=True,
                                                         meter=meter)
                        loss = loss / c.grad_accum
                        loss.backward()
                    loss_sum += loss.item()
                    tokens += targets
                if c.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                meter.step_done()
                elapsed = time.perf_counter() - t0
                if self.step % c.log_interval == 0:
                    loss_sum = distributed.mean_across_ranks({"loss": loss_sum})["loss"]
                    self._log(metrics, {"step": self.step, "train_loss": loss_sum, "lr": lr, "time": elapsed,
                                        **meter.interval()})
                    bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
                if c.time_budget is not None and distributed.from_main(elapsed >= c.time_budget):
                    stop_reason = "time_budget"
                    break
            self.elapsed = time.perf_counter() - t0
            with meter.paused():
                if self.step != self._evaluated_step:
                    final = self._evaluate(metrics, self.elapsed)
                else:  # resumed where the run had stopped: already logged and checkpointed
                    final = self.estimate_loss()
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        if self.is_main:
            with self._writing(self.run_dir / "loss.png"):
                self._plot()
        tokens = distributed.sum_across_ranks(tokens)
        return {
            "steps": self.step,
            "stop_reason": stop_reason,
            "train_loss": final.get("train"),
            "val_loss": final.get("val"),
            "best_val_loss": self.best_val,
            "best_step": self.best_step,
            "seconds": self.elapsed,
            "tokens_per_second": tokens / max(self.elapsed, 1e-9),
            **meter.summary(),
            "precision": self.precision_reason,
            "compile_cold_start_seconds": meter.cold_start_seconds() if c.compile else None,
            "parameters": self.model.num_parameters(),
            "device": str(self.device),
        }

    def _log(self, metrics: MetricsLog | None, record: dict[str, Any]) -> None:
        if metrics is None:  # a rank other than 0
            return
        with self._writing(metrics.path):
            metrics.write(record)

    def _evaluate(self, metrics: MetricsLog, elapsed: float) -> dict[str, float]:
        losses = self.estimate_loss()
        self._log(metrics, {"step": self.step, "time": elapsed, **{f"{k}_eval_loss": v for k, v in losses.items()}})
        self._evaluated_step = self.step
        self.elapsed = elapsed
        val = losses.get("val", losses.get("train"))
        if val is not None and val < self.best_val:
            self.best_val, self.best_step = val, self.step
            with self._writing(self.run_dir / "best"):
                self.save_checkpoint(self.run_dir / "best")
            self.checkpoint_step = self.step
        with self._writing(self.run_dir / "last"):
            self.save_checkpoint(self.run_dir / "last")
        self.checkpoint_step = self.step
        distributed.barrier()  # every rank waits for rank 0's writes
        return losses

    def _plot(self) -> None:
        from lmlab.plots import plot_loss_curves

        plot_loss_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")

    # ---------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: Path) -> None:
        """Write the checkpoint to a temporary directory, then swap it in (never half-written).

        Every rank calls it: the random streams of all ranks are gathered, and a model
        sharded by FSDP is gathered whole, so the files are those of a single process
        (plus the other ranks' dropout streams); rank 0 alone writes them."""
        from safetensors.torch import save

        sharded = distributed.is_sharded(self.parallel)
        weights = distributed.full_state(self.model.state_dict()) if sharded else None
        optimizer_state = self.optimizer.state_dict()
        if sharded:
            optimizer_state["state"] = {pid: distributed.full_state(s) for pid, s in optimizer_state["state"].items()}
        streams = distributed.gather_to_main(self._rank_rng_state())
        if not self.is_main:
            return
        with staged_directory(directory, replace=True, parents=False) as tmp:
            save_model(self.model, tmp, state_dict=weights)
            if self.tokenizer is not None:
                self.tokenizer.save(tmp / "tokenizer.json")
            opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
            atomic_write_bytes(tmp / "optimizer.safetensors", save(opt_tensors))
            rng = {"generator": self.generator.get_state()}
            for rank, state in enumerate(streams):
                rng.update({(key if rank == 0 else f"{key}.rank{rank}"): value for key, value in state.items()})
            atomic_write_bytes(tmp / "rng.safetensors", save(rng))
            state = {
                "step": self.step,
                "best_val": self.best_val,
                "best_step": self.best_step,
                "elapsed": self.elapsed,
                "optimizer": opt_meta,
                "train_config": dataclasses.asdict(self.config),
            }
            atomic_write_text(tmp / "trainer.json", json.dumps(state, indent=2) + "\n")

    def _load_checkpoint(self, directory: Path) -> None:
        from safetensors.torch import load_file

        saved = load_model(directory)
        if dataclasses.asdict(saved.config) != dataclasses.asdict(self.model.config):
            raise ValueError(
                f"the checkpoint at {directory} has config {dataclasses.asdict(saved.config)}, "
                f"which does not match the model being trained {dataclasses.asdict(self.model.config)}"
            )
        state = json.loads((directory / COMPLETE_MARK).read_text())
        check_resumed_config(self.config, state.get("train_config", {}), directory / COMPLETE_MARK)
        saved_tokenizer = directory / "tokenizer.json"
        if self.tokenizer is not None and saved_tokenizer.is_file():
            if json.loads(saved_tokenizer.read_text(encoding="utf-8")) != json.loads(self.tokenizer.to_json()):
                raise ValueError(f"the tokenizer given differs from the run's {saved_tokenizer}; "
                                 "resume with the data and tokenizer settings the run was started with")
        own = self.model.state_dict()  # sharded tensors under FSDP: each rank loads its shard
        self.model.load_state_dict({k: distributed.shard_like(v, own[k]) for k, v in saved.state_dict().items()})
        opt = _unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")), state["optimizer"])
        ordered = [p for group in self.optimizer.param_groups for p in group["params"]]
        for pid, pstate in opt["state"].items():
            for key, value in pstate.items():
                if key != "step" and pid < len(ordered):
                    pstate[key] = distributed.shard_like(value, ordered[pid])
        self.optimizer.load_state_dict(opt)
        rng = load_file(str(directory / "rng.safetensors"))
        self.generator.set_state(rng["generator"])
        self._set_rank_rng_state(rng, state["step"])
        self.step, self.best_val, self.best_step = state["step"], state["best_val"], state["best_step"]
        self.elapsed = state["elapsed"]
        self.checkpoint_step = self._evaluated_step = self.step

    def _rank_rng_state(self) -> dict[str, torch.Tensor]:
        """This rank's global random streams (dropout, masks): CPU, and CUDA when present."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.device if self.device.type == "cuda" else None)
        return rng

    def _set_rank_rng_state(self, rng: dict[str, torch.Tensor], step: int) -> None:
        """Restore this rank's streams from a checkpoint; a rank the saving run did not have
        starts fresh ones from the seed, its rank and the step."""
        suffix = "" if self.rank == 0 else f".rank{self.rank}"
        if "torch" + suffix in rng:
            torch.set_rng_state(rng["torch" + suffix])
        else:
            torch.manual_seed(self.config.seed + self.rank + 1_000_003 * step)
        if "cuda" + suffix in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda" + suffix])


def check_resumed_config(config: TrainConfig, saved: dict[str, Any], source: Path | str) -> None:
    """Refuse a resume whose ``config`` differs from the run's ``saved`` one in a field
    that may not change (every field but :data:`CHANGEABLE_ON_RESUME`)."""
    current = dataclasses.asdict(config)
    differ = [(k, saved[k], current[k]) for k in current
              if k in saved and k not in CHANGEABLE_ON_RESUME and saved[k] != current[k]]
    if differ:
        listed = ", ".join(f"{k}={old!r} (given {new!r})" for k, old, new in differ)
        raise ValueError(
            f"cannot resume with a different training config: the run has {listed} in {source}; "
            f"only {', '.join(CHANGEABLE_ON_RESUME)} may change on resume"
        )


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> flat tensors for safetensors + JSON metadata (param groups)."""
    tensors = {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{pid}.{key}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = t
    return {"state": state, "param_groups": meta["param_groups"]}
