"""Surrogate-gradient training: CPU or CUDA (with AMP), one process or many under ``torchrun``
(DistributedDataParallel; ``gloo`` on CPU, ``nccl`` on GPUs), seeded, resumable.

Determinism: :func:`seed_everything` seeds Python, NumPy and torch before the model is built (so
``--seed`` fixes the initial weights); shuffling, augmentation and mixup/CutMix draw from
generators seeded by ``(seed, epoch)`` (and the rank under DDP), so two CPU runs with one seed give
bit-identical weights, and a run resumed from its last checkpoint reaches the same weights as an
uninterrupted one (on CPU).

Learning rate, per optimizer step ``s`` of ``S = epochs * steps_per_epoch`` with ``W`` warmup
steps (``warmup_epochs * steps_per_epoch``, rounded), ``a = warmup_start_ratio``, ``f = min_lr_ratio``::

    s < W:   lr(s) = lr * (a + (1 - a) * s / W)                          linear warmup
    s >= W:  lr(s) = lr * (f + (1 - f) * (1 + cos(pi * (s - W) / (S - W))) / 2)   schedule "cosine"
             lr(s) = lr                                                  schedule "constant"

With the defaults (no warmup, cosine) this is :func:`cosine`, the schedule used before warmup existed.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .checkpoint import TRAIN_STATE, load_checkpoint, load_train_state, save_checkpoint
from .console import show_progress
from .data import DataSplit, make_loader
from .errors import ConfigError
from .models import direct_encode
from .neurons import SLIF


SCHEDULES = ("cosine", "constant")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (call before building the model)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _type_problems(cfg) -> list[str]:
    """Fields whose value has the wrong type (a TOML string for a number, ``true`` for a count)."""
    problems = []
    for f in cfg.__dataclass_fields__.values():
        v = getattr(cfg, f.name)
        kind = str(f.type)
        if kind.startswith("int") and v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            problems.append(f"{f.name} must be an integer, got {v!r:.40}")
        elif kind == "float" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            problems.append(f"{f.name} must be a finite number, got {v!r:.40}")
        elif kind in ("str", "bool") and not isinstance(v, {"str": str, "bool": bool}[kind]):
            problems.append(f"{f.name} must be a {kind}, got {v!r:.40}")
    return problems


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64             # per process (each DDP rank loads this many)
    lr: float = 2e-3                 # AdamW learning rate of the weights
    weight_decay: float = 0.0        # on weight matrices only (not BN, biases, neuron parameters)
    intrinsic_lr_scale: float = 20.0 # sLIF threshold/leak learn this many times faster (at the weights' rate they barely move)
    min_lr_ratio: float = 0.01       # cosine schedule floor
    schedule: str = "cosine"         # after warmup: "cosine" (down to min_lr_ratio * lr) or "constant"
    warmup_epochs: float = 0.0       # linear warmup length (fractions allowed); 0: none
    warmup_start_ratio: float = 0.0  # warmup starts at this fraction of lr
    label_smoothing: float = 0.0     # cross-entropy label smoothing
    mixup_alpha: float = 0.0         # mixup of batch pairs (x, x.flip(0)), lambda ~ Beta(a, a); 0: off
    cutmix_alpha: float = 0.0        # CutMix, lambda ~ Beta(a, a); with mixup too, each mixed batch picks one at random
    mix_prob: float = 1.0            # probability that a batch is mixed (when mixup or CutMix is on)
    mix_off_epoch: int = 0           # no mixing from this epoch (0-based) on; 0: mix until the end
    max_steps: int | None = None     # stop after this many optimizer steps (smoke tests, timing); the schedule keeps `epochs`
    seed: int = 0
    device: str = "auto"             # "auto" (cuda when present), "cpu", "cuda"
    amp: bool = True                 # bf16/fp16 autocast on CUDA; ignored on CPU
    eval_batch_size: int = 256
    workers: int = 0                 # DataLoader worker processes (0: load in the training process)

    def __post_init__(self):
        problems = _type_problems(self)
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))
        if not (isinstance(self.epochs, int) and self.epochs >= 0):
            problems.append(f"epochs must be an integer >= 0, got {self.epochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            problems.append(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.intrinsic_lr_scale <= 0:
            problems.append("weight_decay must be >= 0 and intrinsic_lr_scale > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not self.warmup_epochs >= 0:
            problems.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.warmup_start_ratio <= 1:
            problems.append(f"warmup_start_ratio must be in [0, 1], got {self.warmup_start_ratio}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            problems.append(f"mixup_alpha and cutmix_alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
        if not 0 <= self.mix_prob <= 1:
            problems.append(f"mix_prob must be in [0, 1], got {self.mix_prob}")
        if not (isinstance(self.mix_off_epoch, int) and self.mix_off_epoch >= 0):
            problems.append(f"mix_off_epoch must be an integer >= 0, got {self.mix_off_epoch!r}")
        if self.max_steps is not None and not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            problems.append(f"max_steps must be None or a positive integer, got {self.max_steps!r}")
        if not (isinstance(self.eval_batch_size, int) and self.eval_batch_size >= 1):
            problems.append(f"eval_batch_size must be a positive integer, got {self.eval_batch_size!r}")
        if not (isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers >= 0):
            problems.append(f"workers must be an integer >= 0, got {self.workers!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto, cpu or cuda, got {self.device!r}")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    @property
    def mixing(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0


@dataclass
class TrainResult:
    test_accuracy: float
    epochs: int
    params: int
    checkpoint: str | None
    seconds: float
    history: list[dict] = field(default_factory=list)
    device: str = "cpu"
    world_size: int = 1
    steps: int = 0                   # optimizer steps taken by this call (fewer than planned when max_steps stopped it)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (no-op otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA GPU is available")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


# ----------------------------------------------------------------------------- helpers
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Three optimizer groups: weight matrices (decayed), other weights (BN, biases), and the
    sLIF intrinsic parameters with their own learning rate and no weight decay."""
    intrinsic = {id(p) for m in model.modules() if isinstance(m, SLIF) for p in m.intrinsic_parameters()}
    decayed, plain, neuron = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in intrinsic:
            neuron.append(p)
        elif p.dim() >= 2:
            decayed.append(p)
        else:
            plain.append(p)
    groups = [
        {"params": decayed, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "name": "weights"},
        {"params": plain, "weight_decay": 0.0, "lr": cfg.lr, "name": "norm_bias"},
        {"params": neuron, "weight_decay": 0.0, "lr": cfg.lr * cfg.intrinsic_lr_scale, "name": "intrinsic"},
    ]
    return [g for g in groups if g["params"]]


def cosine(total_steps: int, floor: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if total_steps <= 0:
            return 1.0
        progress = min(step / total_steps, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def lr_schedule(total_steps: int, warmup_steps: int, floor: float, schedule: str = "cosine",
                warmup_start: float = 0.0) -> Callable[[int], float]:
    """The learning-rate factor at optimizer step ``step`` (module docstring): linear warmup from
    ``warmup_start`` to 1 over ``warmup_steps``, then cosine down to ``floor`` at ``total_steps``
    (or constant). Without warmup the cosine part equals :func:`cosine`."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    decay = cosine(total_steps - warmup_steps, floor) if schedule == "cosine" else (lambda step: 1.0)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_start + (1 - warmup_start) * step / warmup_steps
        return decay(step - warmup_steps)

    return factor


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: TrainConfig,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix of a batch with its reverse (timm's "batch" mode); returns the mixed inputs
    and soft targets ``(B, num_classes)``. Label smoothing is left to the loss. Unmixed batches
    (probability ``1 - mix_prob``) come back with one-hot targets.

    Mixup: ``x' = lam x + (1 - lam) x.flip(0)``. CutMix: a box of area ``(1 - lam) H W`` (centre
    uniform, clipped at the border) is pasted from ``x.flip(0)`` into the last two (H, W) dims;
    ``lam`` is then the uncovered fraction. ``x`` is ``(B, C, H, W)`` or ``(B, T, C, H, W)``.
    """
    onehot = nn.functional.one_hot(y, num_classes).to(torch.float32)
    if rng.random() >= cfg.mix_prob:
        return x, onehot
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < 0.5)
    if use_cutmix:
        lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
        h, w = x.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
        x = lam * x + (1 - lam) * x.flip(0)
    return x, lam * onehot + (1 - lam) * onehot.flip(0)


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, timesteps: int, batch_size: int = 256, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (items ``(x, y)``)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in make_loader(dataset, batch_size, shuffle=False):
        logits = model(direct_encode(x.to(device), timesteps))
        correct += (logits.argmax(1).cpu() == y).sum().item()
        total += y.numel()
    model.train(was_training)
    return correct / max(total, 1)


# ----------------------------------------------------------------------------- the loop
def train(model: nn.Module, data: DataSplit, cfg: TrainConfig, out: str | os.PathLike | None = None, *,
          resume: bool = False, progress: bool = True, meta: dict | None = None,
          regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
          on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train ``model`` on ``data``; checkpoint to ``out`` after every epoch.

    ``regularizer(model)`` adds a penalty to the loss (pruning's L1 or group penalties);
    ``on_step(step, total_steps)`` runs after each optimizer step (pruning schedules).
    With ``cfg.max_steps`` the run stops after that many steps (counted from the start of the
    planned schedule); an epoch cut short is evaluated and saved without training state, so such
    a checkpoint loads but does not resume.
    With ``resume``, weights and optimizer state come from ``out`` and training continues after
    the last finished epoch.
    """
    torch.set_flush_denormal(True)  # denormal floats once made one epoch 25x slower on a CPU
    world = init_distributed(resolve_device(cfg.device))
    device = resolve_device(cfg.device, world.local_rank)
    torch.manual_seed(cfg.seed)
    timesteps = model.cfg.timesteps
    start_epoch, history = 0, []
    state = None
    if resume:
        if out is None:
            raise ConfigError("--resume needs the checkpoint folder given by --out")
        state = load_train_state(out)
        if state is None:
            raise ConfigError(f"--resume: {out} has no {TRAIN_STATE} (no run there, or one cut short by --max-steps, "
                              "or a pruned checkpoint); start again with --overwrite")
        if "schedule" not in state:
            raise ConfigError(f"--resume: {Path(out) / TRAIN_STATE} lacks the 'schedule' state; start again with --overwrite")
        if state["epoch"] > cfg.epochs:
            raise ConfigError(f"--resume: {out} has finished {state['epoch']} epochs, more than --epochs {cfg.epochs}")
        loaded = load_checkpoint(out).model
        model.load_state_dict(loaded.state_dict())
        start_epoch, history = int(state["epoch"]), list(state.get("history", []))
    model.to(device)
    net = model
    if world.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    sampler = None
    if world.world_size > 1:
        sampler = torch.utils.data.DistributedSampler(data.train, num_replicas=world.world_size, rank=world.rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = len(make_loader(data.train, cfg.batch_size, shuffle=sampler is None, seed=cfg.seed, sampler=sampler))
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(total_steps, warmup_steps, cfg.min_lr_ratio,
                                                                        cfg.schedule, cfg.warmup_start_ratio))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported())
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    num_classes = model.cfg.num_classes
    t0 = time.perf_counter()
    step = start_epoch * steps_per_epoch
    steps_taken = 0
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        torch.manual_seed(cfg.seed * 1000 + epoch)  # augmentation and anything else random: fixed per epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = make_loader(data.train, cfg.batch_size, shuffle=sampler is None, seed=cfg.seed, epoch=epoch, sampler=sampler,
                             num_workers=cfg.workers, pin_memory=device.type == "cuda")
        net.train()
        seen = correct = 0
        loss_sum = 0.0
        epoch_t0 = time.perf_counter()
        mixing = cfg.mixing and not (cfg.mix_off_epoch and epoch >= cfg.mix_off_epoch)
        mix_rng = np.random.default_rng([cfg.seed % 2 ** 63, epoch, world.rank]) if mixing else None
        batches = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and world.main and show_progress()), leave=False, unit="batch", mininterval=1.0)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            target = y
            if mixing:
                x, target = mix_batch(x, y, num_classes, cfg, mix_rng)
            with _autocast(device, cfg.amp):
                logits = net(direct_encode(x, timesteps))
                loss = loss_fn(logits.float(), target)
                if regularizer is not None:
                    loss = loss + regularizer(model)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            step += 1
            steps_taken += 1
            batches += 1
            if on_step is not None:
                on_step(step, total_steps)
            seen += y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * y.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        test_acc = evaluate(model, data.test, timesteps, cfg.eval_batch_size, device)
        record = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                  "test_accuracy": test_acc, "seconds": time.perf_counter() - epoch_t0,
                  "lr": optimizer.param_groups[0]["lr"]}
        finished = batches == steps_per_epoch
        if not finished:
            record["steps"] = batches  # cut short by max_steps
        history.append(record)
        if progress and world.main:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}  train {record['train_accuracy']:.4f}  test {test_acc:.4f}  ({record['seconds']:.1f} s)")
        if out is not None and world.main:
            state_doc = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "history": history}
            save_checkpoint(out, model, meta={**(meta or {}), "train": asdict(cfg), "history": history, "data": data.name},
                            train_state=state_doc if finished else None)
            if not finished:  # an older epoch's state would resume from weights it does not match
                (Path(out) / TRAIN_STATE).unlink(missing_ok=True)
    if world.world_size > 1:
        dist.barrier()
    test_acc = history[-1]["test_accuracy"] if history else evaluate(model, data.test, timesteps, cfg.eval_batch_size, device)
    return TrainResult(test_accuracy=test_acc, epochs=cfg.epochs, params=count_params(model),
                       checkpoint=str(Path(out)) if out is not None else None, seconds=time.perf_counter() - t0,
                       history=history, device=str(device), world_size=world.world_size, steps=steps_taken)
