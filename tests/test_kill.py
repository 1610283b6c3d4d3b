"""SIGKILL during training, at random instants and before every kind of file-system step of a
checkpoint save: the checkpoint on disk always loads, and resuming reaches the uninterrupted run's
weights bit for bit. Children are forked (no second torch import), so 24 trials take seconds."""

import os
import pathlib
import random
import shutil
import signal
import tempfile
import time

import pytest
import torch

from stdeploy import checkpoint as ckmod
from stdeploy.checkpoint import load_checkpoint, load_train_state
from stdeploy.data import load_dataset
from stdeploy.models import ModelConfig, build_model
from stdeploy.train import TrainConfig, seed_everything, train

TINY = ModelConfig(family="sdt", embed_dim=16, depth=1, heads=2, timesteps=2, image_size=8, name="kill-tiny")
CFG = TrainConfig(epochs=3, batch_size=16, seed=2, device="cpu", eval_batch_size=64)
OP_TRIALS, TIMER_TRIALS = 20, 6

# (owner, attribute): the file-system steps of a save, counted, and where a child kills itself
STEPS = [(ckmod, "save_file"), (ckmod, "fsync_file"), (ckmod, "fsync_dir"), (ckmod, "exchange"), (torch, "save"),
         (os, "replace"), (os, "chmod"), (shutil, "rmtree"), (tempfile, "mkdtemp"), (pathlib.Path, "write_text")]


def _data():
    d = load_dataset("digits")
    sub = torch.utils.data.Subset
    return type(d)(**{**d.__dict__, "train": sub(d.train, range(64)), "test": sub(d.test, range(16))})


def _run(data, out, resume=False):
    seed_everything(CFG.seed)
    model = build_model(TINY)
    train(model, data, CFG, out, resume=resume, progress=False)
    return model


def _instrument(kill_at: int | None, counter: list) -> None:
    """Wrap the save steps: count them; with ``kill_at``, SIGKILL this process before step ``kill_at``."""
    for owner, name in STEPS:
        fn = getattr(owner, name)

        def wrapped(*a, __fn=fn, **k):
            counter[0] += 1
            if kill_at is not None and counter[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return __fn(*a, **k)

        setattr(owner, name, wrapped)


def _child(fn) -> int:
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 0
        try:
            fn()
        except BaseException:
            code = 3
        os._exit(code)
    return pid


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sigkill_at_any_instant_then_resume_is_bit_identical(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    data = _data()
    _run(data, tmp_path / "warm-up")  # torch's lazy set-up, once, in the parent: the forked children inherit it
    counter = [0]
    ref_dir = tmp_path / "reference"
    t0 = time.perf_counter()
    pid = _child(lambda: (_instrument(None, counter), _run(data, ref_dir),
                          (tmp_path / "steps").write_text(str(counter[0]))))
    assert os.waitpid(pid, 0)[1] == 0
    duration = time.perf_counter() - t0
    steps = int((tmp_path / "steps").read_text())
    reference = _weights(load_checkpoint(ref_dir).model)
    assert steps > 3 * 5, "every epoch's save counted"

    rng = random.Random(15)
    figures = {"trials": 0, "killed": 0, "loadable_after_kill": 0, "resumed": 0, "fresh": 0, "bit_identical": 0}
    for trial in range(OP_TRIALS + TIMER_TRIALS):
        out = tmp_path / f"t{trial}"
        if trial < OP_TRIALS:  # before a random file-system step of a random save
            kill_at = rng.randint(1, steps)
            pid = _child(lambda: (_instrument(kill_at, [0]), _run(data, out)))
            status = os.waitpid(pid, 0)[1]
        else:  # at a random instant of the whole run
            pid = _child(lambda: _run(data, out))
            time.sleep(rng.uniform(0, duration))
            os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
        figures["trials"] += 1
        assert status in (0, signal.SIGKILL), f"trial {trial}: the run failed ({status})"
        figures["killed"] += status == signal.SIGKILL
        has_checkpoint = out.exists() or ckmod._pending(out) is not None
        if has_checkpoint:  # the last good checkpoint loads, whatever instant the kill hit
            load_checkpoint(out)
            figures["loadable_after_kill"] += 1
        resumable = has_checkpoint and load_train_state(out) is not None
        figures["resumed" if resumable else "fresh"] += 1
        pid = _child(lambda: _run(data, out, resume=resumable))
        assert os.waitpid(pid, 0)[1] == 0, f"trial {trial}: resuming failed"
        got = _weights(load_checkpoint(out).model)
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got), f"trial {trial} differs"
        figures["bit_identical"] += 1
    print("kill test:", figures)
    assert figures["bit_identical"] == OP_TRIALS + TIMER_TRIALS and figures["killed"] >= 20
    warm = _weights(load_checkpoint(tmp_path / "warm-up").model)  # in-process and forked runs agree too
    assert warm.keys() == reference.keys() and all(torch.equal(warm[k], reference[k]) for k in warm)
