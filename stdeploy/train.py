"""Surrogate-gradient training: CPU or CUDA (with AMP), one process or many under ``torchrun``
(DistributedDataParallel; ``gloo`` on CPU, ``nccl`` on GPUs), seeded, resumable.

Determinism: shuffling and augmentation draw from generators seeded by ``(seed, epoch)``, so a
run resumed from its last checkpoint reaches the same weights as an uninterrupted one (on CPU).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .checkpoint import load_checkpoint, load_train_state, save_checkpoint
from .data import DataSplit, make_loader
from .errors import ConfigError
from .models import direct_encode
from .neurons import SLIF


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3                 # AdamW learning rate of the weights
    weight_decay: float = 0.0        # on weight matrices only (not BN, biases, neuron parameters)
    intrinsic_lr_scale: float = 20.0 # sLIF threshold/leak learn this many times faster (METHOD-NOTES)
    min_lr_ratio: float = 0.01       # cosine schedule floor
    seed: int = 0
    device: str = "auto"             # "auto" (cuda when present), "cpu", "cuda"
    amp: bool = True                 # bf16/fp16 autocast on CUDA; ignored on CPU
    eval_batch_size: int = 256

    def __post_init__(self):
        problems = []
        if not (isinstance(self.epochs, int) and self.epochs >= 0):
            problems.append(f"epochs must be an integer >= 0, got {self.epochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            problems.append(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.intrinsic_lr_scale <= 0:
            problems.append("weight_decay must be >= 0 and intrinsic_lr_scale > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto, cpu or cuda, got {self.device!r}")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))


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
    With ``resume``, weights and optimizer state come from ``out`` and training continues after
    the last finished epoch.
    """
    torch.set_flush_denormal(True)  # one epoch once ran 25x slower on denormals (METHOD-NOTES)
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
        if state is not None:
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
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(total_steps, cfg.min_lr_ratio))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported())
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # augmentation and anything else random: fixed per epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = make_loader(data.train, cfg.batch_size, shuffle=sampler is None, seed=cfg.seed, epoch=epoch, sampler=sampler)
        net.train()
        seen = correct = 0
        loss_sum = 0.0
        epoch_t0 = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and world.main), leave=False, unit="batch", mininterval=1.0)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, cfg.amp):
                logits = net(direct_encode(x, timesteps))
                loss = loss_fn(logits.float(), y)
                if regularizer is not None:
                    loss = loss + regularizer(model)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            step += 1
            if on_step is not None:
                on_step(step, total_steps)
            seen += y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * y.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        test_acc = evaluate(model, data.test, timesteps, cfg.eval_batch_size, device)
        record = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                  "test_accuracy": test_acc, "seconds": time.perf_counter() - epoch_t0}
        history.append(record)
        if progress and world.main:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}  train {record['train_accuracy']:.4f}  test {test_acc:.4f}  ({record['seconds']:.1f} s)")
        if out is not None and world.main:
            save_checkpoint(out, model, meta={**(meta or {}), "train": asdict(cfg), "history": history, "data": data.name},
                            train_state={"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "history": history})
    if world.world_size > 1:
        dist.barrier()
    test_acc = history[-1]["test_accuracy"] if history else evaluate(model, data.test, timesteps, cfg.eval_batch_size, device)
    return TrainResult(test_accuracy=test_acc, epochs=cfg.epochs, params=count_params(model),
                       checkpoint=str(Path(out)) if out is not None else None, seconds=time.perf_counter() - t0,
                       history=history, device=str(device), world_size=world.world_size)
