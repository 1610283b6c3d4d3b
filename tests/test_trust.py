"""The trust boundary: sealed export directories and checkpoints, nothing overwritten unless asked,
atomic saves (ENOSPC, interrupted saves), file modes, seeding, resource guards, one-line errors."""

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from stdeploy import checkpoint as ckmod
from stdeploy.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from stdeploy.cli import main
from stdeploy.errors import CheckpointError, ConfigError
from stdeploy.export.directory import export_model
from stdeploy.export.manifest import ManifestError, add_listed_file, read_manifest, verify_listed_file
from stdeploy.files import resolve_inside
from stdeploy.models import PRESETS, ModelConfig, build_model
from stdeploy.models.budget import check_budget, estimate, param_count
from stdeploy.models.config import load_config_file

TINY = ModelConfig(family="sdt", embed_dim=16, depth=1, heads=2, timesteps=2, image_size=8, name="trust-tiny")


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(capsys, *argv):
    """Run the CLI in-process; (exit status, stderr lines)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small checkpoint and its export directory (noise validation, 8 samples)."""
    root = tmp_path_factory.mktemp("trust")
    torch.manual_seed(0)
    model = build_model(TINY)
    save_checkpoint(root / "ckpt", model)
    export_model(model.eval(), root / "exp", samples=8)
    return root


def _copy_export(exported, tmp_path) -> Path:
    dst = tmp_path / "exp"
    shutil.copytree(exported / "exp", dst, symlinks=True)
    return dst


# ----------------------------------------------------------------------------- sealed export directories
def test_manifest_checks_every_artifact(exported, tmp_path):
    d = _copy_export(exported, tmp_path)
    for key in ("onnx", "onnx.step", "nir", "reference"):
        path, doc = read_manifest(d, key)
        assert path.is_relative_to(d.resolve()) and doc["format"] == "stdeploy-export/1"
    assert set(json.loads((d / "manifest.json").read_text())["artifacts"]["reference"]["files"]) == {"config.json", "model.safetensors"}
    # a swapped model of the same size: one byte changed
    onnx = d / "model.onnx"
    raw = bytearray(onnx.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    onnx.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=r"model.onnx: sha256 does not match .*artifacts.onnx"):
        read_manifest(d, "onnx")
    onnx.write_bytes(bytes(raw[:-7]))
    with pytest.raises(ManifestError, match="bytes, the manifest says"):
        read_manifest(d, "onnx")
    # the reference checkpoint is sealed too
    cfg = d / "reference" / "config.json"
    cfg.write_text(cfg.read_text().replace('"depth": 1', '"depth": 2'))
    with pytest.raises(ManifestError, match=r"reference/config.json|config.json: .*sha256"):
        read_manifest(d, "reference")


@pytest.mark.parametrize("case, field", [
    ("random bytes", "not valid JSON"),
    ("json list", "expected a JSON object, got a list"),
    ("number file", "artifacts.onnx.file must be a non-empty string, got 7"),
    ("dotdot", "artifacts.onnx.file = '../../../../etc/passwd' climbs out"),
    ("absolute", "artifacts.onnx.file = '/etc/passwd' is an absolute path"),
    ("symlink out", "artifacts.onnx.file = 'model.onnx' leads outside"),
    ("no sha", "artifacts.onnx has no size and sha256"),
    ("bad sha", "artifacts.onnx.sha256 must be 64 lowercase hex digits"),
    ("artifacts list", "field 'artifacts' must be an object"),
])
def test_bad_manifests_are_refused_naming_the_field(exported, tmp_path, case, field):
    d = _copy_export(exported, tmp_path)
    m = d / "manifest.json"
    doc = json.loads(m.read_text())
    if case == "random bytes":
        m.write_bytes(os.urandom(200))
    elif case == "json list":
        m.write_text("[1, 2]")
    elif case == "artifacts list":
        m.write_text(json.dumps({**doc, "artifacts": ["model.onnx"]}))
    else:
        art = doc["artifacts"]["onnx"]
        if case == "number file":
            art["file"] = 7
        elif case == "dotdot":
            art["file"] = "../../../../etc/passwd"
        elif case == "absolute":
            art["file"] = "/etc/passwd"
        elif case == "no sha":
            del art["sha256"]
        elif case == "bad sha":
            art["sha256"] = "x" * 64
        elif case == "symlink out":
            outside = tmp_path / "other.onnx"
            shutil.copy(d / "model.onnx", outside)
            (d / "model.onnx").unlink()
            (d / "model.onnx").symlink_to(outside)
        m.write_text(json.dumps(doc))
    with pytest.raises(ManifestError) as err:
        read_manifest(d, "onnx")
    assert field in str(err.value) and "\n" not in str(err.value)


def test_cli_run_refuses_a_swapped_model(exported, tmp_path, capsys):
    d = _copy_export(exported, tmp_path)
    shutil.copy(d / "model.step.onnx", d / "model.onnx")  # another valid model
    rc, err = _cli(capsys, "run", d, "--target", "onnxruntime", "--limit", "4", "--quiet")
    assert rc == 2 and len(err) == 1 and "model.onnx" in err[0] and "Traceback" not in err[0]


def test_verify_and_add_listed_file(exported, tmp_path):
    d = _copy_export(exported, tmp_path)
    lib = d / "model.cpu.so"
    lib.write_bytes(b"\x7fELF compiled code")
    with pytest.raises(ManifestError, match="not listed"):
        verify_listed_file(d, "model.cpu.so")
    entry = add_listed_file(d, "model.cpu.so")
    assert entry["bytes"] == lib.stat().st_size and verify_listed_file(d, "model.cpu.so") == lib.resolve()
    assert verify_listed_file(d, "model.onnx") == (d / "model.onnx").resolve()
    assert verify_listed_file(d, "reference/model.safetensors") == (d / "reference" / "model.safetensors").resolve()
    read_manifest(d, "onnx")  # the manifest stays valid after the addition
    lib.write_bytes(b"\x7fELF other code!!!")  # same size, other bytes
    with pytest.raises(ManifestError, match="sha256 does not match"):
        verify_listed_file(d, "model.cpu.so")
    for bad, why in (("/usr/lib/libc.so.6", "absolute"), ("../x.so", "climbs out")):
        with pytest.raises(ManifestError, match=why):
            verify_listed_file(d, bad)
        with pytest.raises(ManifestError, match=why):
            add_listed_file(d, bad)
    (tmp_path / "evil.so").write_bytes(b"evil")
    (d / "link.so").symlink_to(tmp_path / "evil.so")
    with pytest.raises(ManifestError, match="leads outside"):
        add_listed_file(d, "link.so")


def test_resolve_inside_rules(tmp_path):
    (tmp_path / "a").mkdir()
    assert resolve_inside(tmp_path, "a/b.txt", "f") == tmp_path.resolve() / "a" / "b.txt"
    for rel in ("", "..", "a/../../x", "/etc/passwd", "C:\\x", "\\\\server\\x", 3, None, "a\x00b"):
        with pytest.raises(ValueError):
            resolve_inside(tmp_path, rel, "f")


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("weights", ["../other/model.safetensors", "/etc/passwd", "sub/model.safetensors", "..", 5])
def test_checkpoint_weights_must_be_a_plain_name(tmp_path, weights):
    save_checkpoint(tmp_path / "c", build_model(TINY))
    cfg = tmp_path / "c" / "config.json"
    doc = json.loads(cfg.read_text())
    doc["weights"] = weights
    cfg.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="field 'weights' must be a plain file name"):
        load_checkpoint(tmp_path / "c")


def test_checkpoint_weights_symlink_out_refused(tmp_path):
    save_checkpoint(tmp_path / "c", build_model(TINY))
    w = tmp_path / "c" / "model.safetensors"
    shutil.move(w, tmp_path / "elsewhere.safetensors")
    w.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="leads outside"):
        load_checkpoint(tmp_path / "c")


def test_save_is_atomic_under_enospc_and_cleans_leftovers(tmp_path, monkeypatch):
    torch.manual_seed(1)
    first = build_model(TINY)
    save_checkpoint(tmp_path / "c", first, train_state={"epoch": 1, "optimizer": {}})
    good = _weights(first)
    second = build_model(TINY)
    written = {}

    def full_disk(state, path, metadata=None):
        written["tmp_mode"] = stat.S_IMODE(Path(path).parent.stat().st_mode)
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckmod, "save_file", full_disk)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "c", second)
    monkeypatch.undo()
    assert written["tmp_mode"] == 0o700, "a checkpoint being written is private"
    assert _same(_weights(load_checkpoint(tmp_path / "c").model), good)
    assert load_train_state(tmp_path / "c")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"], "no temporary folder left"
    # a killed save leaves a sibling folder: the next save removes it
    (tmp_path / ".c.new-dead").mkdir()
    (tmp_path / ".c.new-dead" / "model.safetensors").write_bytes(b"half")
    save_checkpoint(tmp_path / "c", second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert _same(_weights(load_checkpoint(tmp_path / "c").model), _weights(second))
    assert load_train_state(tmp_path / "c") is None, "the new save has no training state: none is left from the old one"


def test_two_rename_fallback_and_its_window(tmp_path, monkeypatch):
    """Where renameat2 is missing the swap takes two renames; a kill between them leaves the new
    complete folder beside a missing one: the loader reads it and the next save moves it in."""
    monkeypatch.setattr(ckmod, "exchange", lambda a, b: False)
    a, b = build_model(TINY), build_model(TINY)
    save_checkpoint(tmp_path / "c", a)
    save_checkpoint(tmp_path / "c", b)
    assert _same(_weights(load_checkpoint(tmp_path / "c").model), _weights(b))
    os.rename(tmp_path / "c", tmp_path / ".c.new-killed")  # the window: old renamed aside (and deleted), new not yet in
    assert _same(_weights(load_checkpoint(tmp_path / "c").model), _weights(b))
    save_checkpoint(tmp_path / "c", a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_save_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        save_checkpoint(tmp_path / "notes", build_model(TINY))
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "years of work"


def test_finished_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "c", build_model(TINY))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "c").iterdir()} == {0o640}


def test_train_state_types_and_pickles(tmp_path):
    save_checkpoint(tmp_path / "c", build_model(TINY), train_state={"epoch": 1, "optimizer": {}})
    torch.save({"epoch": "three", "optimizer": [], "history": 5}, tmp_path / "c" / "train_state.pt")
    with pytest.raises(CheckpointError, match=r"'epoch' must be an integer >= 0.*'optimizer' must be a state dict.*'history' must be a list"):
        load_train_state(tmp_path / "c")
    torch.save(Path("/x"), tmp_path / "c" / "train_state.pt")  # an object weights_only refuses
    with pytest.raises(CheckpointError) as err:
        load_train_state(tmp_path / "c")
    assert "weights_only=False" not in str(err.value) and "could run code" in str(err.value)


def test_nan_weights_refused(tmp_path):
    model = build_model(TINY)
    with torch.no_grad():
        model.head.fc.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "c", model)
    with pytest.raises(CheckpointError, match="head.fc.weight.*NaN"):
        load_checkpoint(tmp_path / "c")


# ----------------------------------------------------------------------------- nothing overwritten unless asked
def test_cli_out_guards(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "ck"
    shutil.copytree(exported / "ckpt", ck)
    before = {p: p.read_bytes() for p in ck.iterdir()}
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases = [
        (("export", ck, "--out", ck), "overlap"),
        (("export", ck, "--out", ck / "sub"), "overlap"),
        (("export", ck, "--out", "."), "current folder"),
        (("export", ck, "--out", tmp_path / "full"), "pass --overwrite"),
        (("prune", ck, "--out", ck), "overlap"),
        (("prune", ck, "--out", tmp_path / "full", "--overwrite"), "not a checkpoint"),
        (("train", "--out", ck, "--epochs", "1"), "pass --resume to continue it or --overwrite"),
        (("train", "--out", ck, "--resume", "--overwrite"), "contradict"),
        (("train", "--out", tmp_path / "none", "--resume"), "no checkpoint at"),
        (("train", "--out", ck, "--resume", "--epochs", "1", "--quiet"), "no train_state.pt"),
    ]
    for argv, why in cases:
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and len(err) == 1 and why in err[0], (argv, err)
    assert {p: p.read_bytes() for p in ck.iterdir()} == before
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    rc, err = _cli(capsys, "export", ck, "--out", tmp_path / "full", "--overwrite", "--samples", "4", "--format", "onnx", "--quiet")
    assert rc == 0, err
    assert not (tmp_path / "full" / "keep.txt").exists() and read_manifest(tmp_path / "full", "onnx")[0].is_file()


def test_cli_os_errors_are_one_line(exported, tmp_path, capsys, monkeypatch):
    ck = tmp_path / "ck"
    shutil.copytree(exported / "ckpt", ck)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("stdeploy.export.directory.save_checkpoint", no_space)
    rc, err = _cli(capsys, "export", ck, "--out", tmp_path / "e", "--samples", "4", "--format", "onnx", "--quiet")
    assert rc == 2 and len(err) == 1 and "no space left on the device" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"], "nothing half-written"

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "e"))

    monkeypatch.setattr("stdeploy.export.directory.save_checkpoint", read_only)
    rc, err = _cli(capsys, "export", ck, "--out", tmp_path / "e", "--samples", "4", "--format", "onnx", "--quiet")
    assert rc == 2 and len(err) == 1 and "read-only" in err[0] and str(tmp_path / "e") in err[0]


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_weights_other_seed_other_weights(tmp_path, capsys):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        rc, err = _cli(capsys, "train", "--epochs", "1", "--max-steps", "2", "--batch-size", "16", "--seed", seed,
                       "--out", tmp_path / name, "--quiet", "--device", "cpu", "--set", "model.embed_dim=16",
                       "--set", "model.heads=2", "--timesteps", "2")
        assert rc == 0, err
        runs[name] = _weights(load_checkpoint(tmp_path / name).model)
    assert _same(runs["a"], runs["b"]), "two CPU runs with one seed give bit-identical weights"
    assert not _same(runs["a"], runs["c"])


# ----------------------------------------------------------------------------- resource guards
def test_budget_estimate_and_refusal(tmp_path, capsys):
    for cfg in PRESETS.values():  # exact for every preset (built on the meta device)
        assert param_count(cfg) == sum(p.numel() for p in build_model(cfg).parameters()) if cfg.embed_dim <= 64 else param_count(cfg) > 0
    big = ModelConfig(embed_dim=4096, depth=64, heads=8, image_size=32, in_channels=3, embed_stages=4, embed_pools=2)
    with pytest.raises(ConfigError, match=r"needs about .* GiB .*embed_dim=4096.*--max-memory-gb"):
        check_budget(big, batch=64, training=True, limit_bytes=16 << 30)
    assert estimate(TINY, 8, True).bytes < estimate(TINY, 16, True).bytes < 64 << 20
    cfg = tmp_path / "huge.toml"
    cfg.write_text("[model]\nembed_dim = 8192\ndepth = 256\nheads = 8\n")
    rc, err = _cli(capsys, "train", "--model", cfg, "--out", tmp_path / "o", "--quiet", "--device", "cpu", "--max-memory-gb", "4")
    assert rc == 2 and len(err) == 1 and "GiB" in err[0] and "depth=256" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, suffix, why", [
    ("[model]\ndepth = true\n", ".toml", "depth must be a non-negative integer, got True"),
    ("[model]\nembed_dim = 1000000000\n", ".toml", "embed_dim = 1000000000 is beyond"),
    ("[model]\ntimesteps = 1000000000\n", ".toml", "timesteps = 1000000000 is beyond"),
    ("[model]\ntau = nan\n", ".toml", "tau must be a finite number"),
    ("[model]\nembed_dim = \"64\"\n", ".toml", "embed_dim must be a positive integer, got '64'"),
    ("model: !!python/object/apply:os.system ['true']\n", ".yaml", "cannot parse"),
    ("a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\nembed_dim: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n", ".yaml", "unknown model config keys"),
    ("a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\nmodel: {embed_dim: [*d,*d,*d,*d,*d,*d,*d,*d,*d]}\n", ".yaml", "embed_dim must be a positive integer, got [[[...], [...], [...], [...], ...]"),
    ("[model\n", ".toml", "cannot parse"),
    ("[1, 2]", ".json", "expected a table"),
])
def test_bad_model_configs_one_line(tmp_path, text, suffix, why):
    p = tmp_path / f"m{suffix}"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config_file(p)
    assert why in str(err.value) and "\n" not in str(err.value) and len(str(err.value)) < 2000


def test_binary_config_refused(tmp_path):
    p = tmp_path / "m.toml"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config_file(p)


def test_atomic_write_private_while_temporary_then_umask_mode(tmp_path):
    from stdeploy.files import atomic_write

    seen = {}

    def write(tmp):
        seen["mode"] = stat.S_IMODE(os.stat(tmp).st_mode)
        Path(tmp).write_text("x")

    for mask, mode in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(mask)
        try:
            atomic_write(tmp_path / f"f{mask}", write)
        finally:
            os.umask(old)
        assert seen["mode"] == 0o600 and stat.S_IMODE((tmp_path / f"f{mask}").stat().st_mode) == mode


def test_export_directory_gets_the_umask_mode(exported, tmp_path):
    ck = load_checkpoint(exported / "ckpt")
    old = os.umask(0o027)
    try:
        export_model(ck.model.eval(), tmp_path / "e", ("onnx",), samples=4)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "e").stat().st_mode) == 0o750
    (tmp_path / ".e.tmp-killed").mkdir()  # a killed export's temporary folder: the next export removes it
    (tmp_path / ".e.tmp-killed" / "model.onnx").write_bytes(b"half")
    export_model(ck.model.eval(), tmp_path / "e", ("onnx",), samples=4, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    with pytest.raises(ConfigError, match="pass --overwrite"):
        export_model(ck.model.eval(), tmp_path / "e", ("onnx",), samples=4)


def test_nir_graph_with_nan_parameters_refused(tmp_path):
    """A hand-made NIR file whose LIF has tau = NaN is refused naming the node and field, not run."""
    import nir
    import numpy as np

    from stdeploy.errors import UnsupportedPrimitive
    from stdeploy.export.nir_interpreter import load_graph

    graph = nir.NIRGraph.from_list(
        nir.Affine(weight=np.eye(3, dtype=np.float32), bias=np.zeros(3, np.float32)),
        nir.LIF(tau=np.array([2.0, np.nan, 2.0], np.float32), r=np.ones(3, np.float32),
                v_leak=np.zeros(3, np.float32), v_threshold=np.ones(3, np.float32)))
    path = tmp_path / "nan.nir"
    nir.write(str(path), graph)
    with pytest.raises(UnsupportedPrimitive, match=r"nan\.nir: node .*\.tau holds NaN"):
        load_graph(path)
