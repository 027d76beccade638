"""A plain training loop: AdamW, warmup + cosine, clipping, accumulation,
periodic evaluation, best/last checkpoints, exact resume, JSON-lines metrics.

A run lives in its own directory::

    run/
      metrics.jsonl        one JSON object per logged step or evaluation
      loss.png             train and validation loss curves
      best/  last/         checkpoints: config.json, model.safetensors, tokenizer.json,
                           optimizer.safetensors, trainer.json (step, RNG, config)
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

from lmlab.data import IGNORE
from lmlab.models.base import LanguageModel, atomic_write_bytes, atomic_write_text, load_model, save_model, staged_directory
from lmlab.models.heads import next_token_loss


class Batches(Protocol):
    def sample(self, generator: torch.Generator, device: Any) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TrainConfig:
    max_iters: int = 2000
    batch_size: int = 12
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
    dtype: str = "auto"                 # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "float32" | "bfloat16"
    compile: bool = False               # torch.compile the model (CUDA)
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


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused)


class Trainer:
    """Trains ``model`` on ``train`` batches, evaluates on ``val``, checkpoints into ``run_dir``.

    ``run_dir`` must not exist unless ``resume=True``, in which case training
    continues exactly from ``run_dir/last``. ``loss_fn(model, x, y) -> scalar`` is the
    loss of one batch, for training and evaluation alike (default: the model's own
    objective, see :func:`objective_loss`); subclasses may override
    :meth:`train_loss` to train on something other than what they report.
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
    ) -> None:
        for name, batches in (("train", train), ("val", val)):
            size = getattr(batches, "batch_size", config.batch_size)
            if size != config.batch_size:
                raise ValueError(f"the {name} batches hold {size} rows but config.batch_size={config.batch_size}; "
                                 "build both with the same batch size (the run directory records the config's)")
        self.config = config
        self.loss_fn = loss_fn or objective_loss(model)
        self.run_dir = Path(run_dir)
        self.device = resolve_device(config.device)
        self.train_batches, self.val_batches = train, val
        self.tokenizer = tokenizer
        if self.run_dir.exists() and any(self.run_dir.iterdir()) and not resume:
            raise FileExistsError(
                f"run directory {str(self.run_dir)!r} already exists; pass resume=True (--resume) "
                "to continue it, or choose a new directory"
            )
        if resume and not (self.run_dir / "last" / "trainer.json").is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint at {self.run_dir / 'last'}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model = model.to(self.device)
        self.optimizer = make_optimizer(self.model, config, self.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        self.step = 0
        self.best_val = float("inf")
        self.best_step = -1
        self.elapsed = 0.0
        if resume:
            self._load_checkpoint(self.run_dir / "last")
        self.forward_model = torch.compile(self.model) if config.compile else self.model

    # ---------------------------------------------------------- evaluation

    def autocast(self):
        dtype = self.config.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss the optimizer descends, for one batch."""
        return self.loss_fn(self.forward_model, x, y)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss reported for evaluation, for one batch."""
        return self.loss_fn(self.forward_model, x, y)

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over ``eval_iters`` random batches of each split (fixed seed: same batches,
        and the same random masks for a masked objective, each time; the training RNG is untouched)."""
        self.model.eval()
        out = {}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(12345)
            for split, batches in (("train", self.train_batches), ("val", self.val_batches)):
                if batches is None:
                    continue
                gen = torch.Generator().manual_seed(12345)
                losses = []
                for _ in range(self.config.eval_iters):
                    x, y = batches.sample(gen, self.device)
                    with self.autocast():
                        losses.append(self.eval_loss(x, y).item())
                out[split] = sum(losses) / len(losses)
        self.model.train()
        return out

    # ---------------------------------------------------------- loop

    def fit(self) -> dict[str, Any]:
        """Train to ``max_iters`` (or the time budget); return a summary."""
        c = self.config
        self.model.train()
        metrics = (self.run_dir / "metrics.jsonl").open("a")
        bar = tqdm(total=c.max_iters, initial=self.step, disable=not c.progress, desc="train", dynamic_ncols=True)
        tokens = 0
        t0 = time.perf_counter() - self.elapsed
        stop_reason = "max_iters"
        try:
            while self.step < c.max_iters:
                if self.step % c.eval_interval == 0:
                    self._evaluate(metrics, time.perf_counter() - t0)
                lr = learning_rate(self.step, c)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for _ in range(c.grad_accum):
                    x, y = self.train_batches.sample(self.generator, self.device)
                    with self.autocast():
                        loss = self.train_loss(x, y) / c.grad_accum
                    loss.backward()
                    loss_sum += loss.item()
                    tokens += int((y != IGNORE).sum())
                if c.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                elapsed = time.perf_counter() - t0
                if self.step % c.log_interval == 0:
                    metrics.write(json.dumps({"step": self.step, "train_loss": loss_sum, "lr": lr, "time": elapsed}) + "\n")
                    bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
                if c.time_budget is not None and elapsed >= c.time_budget:
                    stop_reason = "time_budget"
                    break
            self.elapsed = time.perf_counter() - t0
            final = self._evaluate(metrics, self.elapsed)
        finally:
            bar.close()
            metrics.close()
        self._plot()
        return {
            "steps": self.step,
            "stop_reason": stop_reason,
            "train_loss": final.get("train"),
            "val_loss": final.get("val"),
            "best_val_loss": self.best_val,
            "best_step": self.best_step,
            "seconds": self.elapsed,
            "tokens_per_second": tokens / max(self.elapsed, 1e-9),
            "parameters": self.model.num_parameters(),
            "device": str(self.device),
        }

    def _evaluate(self, metrics, elapsed: float) -> dict[str, float]:
        losses = self.estimate_loss()
        record = {"step": self.step, "time": elapsed, **{f"{k}_eval_loss": v for k, v in losses.items()}}
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        self.elapsed = elapsed
        val = losses.get("val", losses.get("train"))
        if val is not None and val < self.best_val:
            self.best_val, self.best_step = val, self.step
            self.save_checkpoint(self.run_dir / "best")
        self.save_checkpoint(self.run_dir / "last")
        return losses

    def _plot(self) -> None:
        from lmlab.plots import plot_loss_curves

        plot_loss_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")

    # ---------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: Path) -> None:
        """Write the checkpoint to a temporary directory, then swap it in (never half-written)."""
        from safetensors.torch import save

        with staged_directory(directory, replace=True) as tmp:
            save_model(self.model, tmp)
            if self.tokenizer is not None:
                self.tokenizer.save(tmp / "tokenizer.json")
            opt_tensors, opt_meta = _flatten_optimizer(self.optimizer.state_dict())
            atomic_write_bytes(tmp / "optimizer.safetensors", save(opt_tensors))
            rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state(self.device if self.device.type == "cuda" else None)
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
        self.model.load_state_dict(saved.state_dict())
        state = json.loads((directory / "trainer.json").read_text())
        opt = _unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")), state["optimizer"])
        self.optimizer.load_state_dict(opt)
        rng = load_file(str(directory / "rng.safetensors"))
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        self.step, self.best_val, self.best_step = state["step"], state["best_val"], state["best_step"]
        self.elapsed = state["elapsed"]


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
