"""Property tests of the trust boundary (hypothesis, fixed example budgets, derandomized): whatever
the argument values or however a file is corrupted (bit flips, truncation, wrong JSON/TOML types,
``..``, absolute paths, symlinks), the CLI exits 0 or 2 with one line on stderr and no traceback,
the library raises only its own one-line errors, and nothing outside ``--out`` changes."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stdeploy.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from stdeploy.cli import main
from stdeploy.errors import StdeployError
from stdeploy.export.directory import export_model
from stdeploy.export.manifest import read_manifest
from stdeploy.models import ModelConfig, build_model
from stdeploy.models.config import load_config_file

TINY = ModelConfig(family="sdt", embed_dim=16, depth=1, heads=2, timesteps=2, image_size=8, name="prop-tiny")
ROOT = Path(__file__).resolve().parents[1]
# allow_subnormal=False: training sets torch.set_flush_denormal(True) for the whole process, after
# which hypothesis cannot draw subnormal floats.
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    torch.manual_seed(0)
    model = build_model(TINY)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(root / "ckpt", model, train_state={"epoch": 1, "optimizer": opt.state_dict(), "schedule": {}, "history": []})
    export_model(model.eval(), root / "exp", samples=8)
    return root


def _tree(root: Path) -> dict:
    """Every file under ``root`` with its bytes (symlinks as their target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p)] = p.read_bytes()
    return out


def _cli(capsys, argv) -> tuple[int, list[str]]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    captured = capsys.readouterr()
    return rc, [line for line in captured.err.splitlines() if line.strip()]


def _one_line_exit(rc, err, argv):
    assert rc in (0, 2), (argv, rc, err)
    assert not any("Traceback" in line for line in err), (argv, err)
    if rc == 2:
        assert len(err) == 1 and err[0].startswith("stdeploy"), (argv, err)


def _library_ok(fn, what):
    """``fn()`` succeeds or raises a one-line StdeployError; anything else fails the test."""
    try:
        fn()
    except StdeployError as err:
        assert "\n" not in str(err) and len(str(err)) < 4000, (what, str(err)[:500])
        return False
    return True


# ----------------------------------------------------------------------------- argument values
junk = st.one_of(st.integers(-10**12, 10**12).map(str), st.sampled_from(["0", "-1", "nan", "inf", "-inf", "1e400", "", " ", "0x10", "1.5", "∞", "--", "None"]),
                 st.text(min_size=0, max_size=8))
COUNT_FLAGS = {"train": ["--batch-size", "--epochs", "--timesteps", "--max-steps", "--seed", "--lr", "--max-memory-gb", "--label-smoothing"],
               "run": ["--batch-size", "--limit"], "export": ["--samples"],
               "prune": ["--epochs", "--batch-size", "--rank", "--seed", "--sparsity", "--param-ratio", "--penalty"],
               "bench": ["--batch", "--repeats", "--warmup"], "tune": ["--trials", "--batch"], "profile": ["--batch", "--repeats", "--limit"]}


@settings(max_examples=60, **SETTINGS)
@given(verb=st.sampled_from(sorted(COUNT_FLAGS)), data=st.data())
def test_any_count_value_exits_0_or_2_with_one_line(sources, tmp_path, capsys, verb, data):
    """Count flags with any value, on inputs that do not exist: argparse or the input check
    answers, in one line, and nothing is written."""
    flags = data.draw(st.lists(st.sampled_from(COUNT_FLAGS[verb]), min_size=1, max_size=3, unique=True))
    missing = tmp_path / "missing"
    argv = {"train": ["train", "--model", missing / "m.toml", "--out", tmp_path / "out"],
            "run": ["run", missing, "--target", "onnxruntime"], "export": ["export", missing, "--out", tmp_path / "out"],
            "prune": ["prune", missing, "--out", tmp_path / "out"], "bench": ["bench", missing],
            "tune": ["tune", missing], "profile": ["profile", missing, "--out", tmp_path / "out"]}[verb]
    for flag in flags:
        argv += [flag, data.draw(junk)]
    before = _tree(sources)
    rc, err = _cli(capsys, argv + ["--quiet"])
    _one_line_exit(rc, err, argv)
    assert rc == 2 and not (tmp_path / "out").exists() and _tree(sources) == before


@settings(max_examples=8, **SETTINGS)
@given(batch=st.integers(-3, 40), limit=st.one_of(st.none(), st.integers(-3, 12)))
def test_run_with_valid_and_invalid_counts(sources, capsys, batch, limit):
    argv = ["run", sources / "exp", "--target", "onnxruntime", "--batch-size", batch, "--quiet", "--json"]
    if limit is not None:
        argv += ["--limit", limit]
    before = _tree(sources)
    rc, err = _cli(capsys, argv)
    _one_line_exit(rc, err, argv)
    assert (rc == 0) == (batch >= 1 and (limit is None or limit >= 1)), (argv, err)
    assert _tree(sources) == before


# ----------------------------------------------------------------------------- corrupted files
def _fresh(sources, name) -> Path:
    d = Path(tempfile.mkdtemp(prefix="prop-")) / name
    shutil.copytree(sources / name, d, symlinks=True)
    return d


def _flip(path: Path, data) -> None:
    raw = bytearray(path.read_bytes())
    if not raw:
        return
    for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4, unique=True)):
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    path.write_bytes(bytes(raw))


def _truncate(path: Path, data) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:data.draw(st.integers(0, max(len(raw) - 1, 0)))])


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_subnormal=False),
                                     st.text(max_size=6), st.sampled_from(["..", "/etc/passwd", "../../x", "C:\\x", "model.onnx"])),
                           lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=4), c, max_size=3)),
                           max_leaves=6)


def _paths(doc, prefix=()):
    """Every key path in a JSON document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _retype(path: Path, data) -> None:
    """Replace one field (any depth) of a JSON file with a value of any type."""
    doc = json.loads(path.read_text())
    keys = list(_paths(doc))
    where = data.draw(st.sampled_from(keys))
    node = doc
    for k in where[:-1]:
        node = node[k]
    node[where[-1]] = data.draw(json_values)
    path.write_text(json.dumps(doc))


def _mutate(root: Path, data) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    target = data.draw(st.sampled_from(files))
    kind = data.draw(st.sampled_from(["flip", "truncate", "retype", "symlink", "delete"] if target.suffix == ".json"
                                     else ["flip", "truncate", "symlink", "delete"]))
    if kind == "flip":
        _flip(target, data)
    elif kind == "truncate":
        _truncate(target, data)
    elif kind == "retype":
        _retype(target, data)
    elif kind == "symlink":  # replaced by a link to a copy outside (same bytes: only the link is wrong)
        outside = root.parent / f"outside-{target.name}"
        shutil.copy(target, outside)
        target.unlink()
        target.symlink_to(outside)
    else:
        target.unlink()
    return f"{kind} {target.relative_to(root)}"


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_corrupted_export_directory_is_loaded_or_refused(sources, data):
    d = _fresh(sources, "exp")
    what = _mutate(d, data)
    results = {key: _library_ok(lambda: read_manifest(d, key), what)
               for key in ("onnx", "onnx.step", "nir", "nir.portable", "reference")}
    if what.startswith(("flip model", "truncate model", "delete model", "symlink model")):
        name = what.split()[1]
        key = {"model.onnx": "onnx", "model.step.onnx": "onnx.step", "model.nir": "nir", "model.portable.nir": "nir.portable"}[name]
        assert not results[key], f"{what}: a changed artifact must be refused"
    if what.split()[1].startswith("reference/") and not what.startswith("retype"):
        assert not results["reference"], f"{what}: a changed reference file must be refused"
    shutil.rmtree(d.parent)


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_corrupted_checkpoint_is_loaded_or_refused(sources, data):
    d = _fresh(sources, "ckpt")
    what = _mutate(d, data)
    loaded = _library_ok(lambda: load_checkpoint(d), what)
    _library_ok(lambda: load_train_state(d), what)
    if what.startswith(("flip model.safetensors", "truncate model.safetensors", "symlink model.safetensors", "delete")) \
            and "train_state" not in what:
        assert not loaded, f"{what}: must be refused"
    shutil.rmtree(d.parent)


@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_cli_on_corrupted_inputs_one_line_nothing_outside_out(sources, tmp_path, capsys, data):
    """``export`` of a corrupted checkpoint and ``run`` of a corrupted export directory: exit 0 or
    2, one line, and the inputs and everything beside --out unchanged."""
    verb = data.draw(st.sampled_from(["export", "run"]))
    d = _fresh(sources, "ckpt" if verb == "export" else "exp")
    _mutate(d, data)
    before = _tree(d.parent)
    out = d.parent / "out"
    argv = (["export", d, "--out", out, "--samples", "4", "--format", "onnx"] if verb == "export"
            else ["run", d, "--target", "onnxruntime", "--limit", "4"]) + ["--quiet"]
    rc, err = _cli(capsys, argv)
    _one_line_exit(rc, err, argv)
    after = {k: v for k, v in _tree(d.parent).items() if not k.startswith(str(out) + os.sep)}
    assert after == before, "only --out may change"
    if rc == 2:
        assert not out.exists(), "nothing half-written"
    shutil.rmtree(d.parent)


toml_values = st.one_of(st.integers(-2**63, 2**63 - 1), st.booleans(), st.floats(allow_nan=True, allow_subnormal=False), st.text(max_size=8),
                        st.lists(st.integers(0, 3), max_size=3))


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


@settings(max_examples=60, **SETTINGS)
@given(field=st.sampled_from([f.name for f in __import__("dataclasses").fields(ModelConfig)] + ["unknown"]), value=toml_values,
       binary=st.booleans(), data=st.data())
def test_model_config_files_any_type(tmp_path, field, value, binary, data):
    p = tmp_path / "m.toml"
    if binary:
        p.write_bytes(data.draw(st.binary(min_size=1, max_size=64)))
    else:
        p.write_text(f"[model]\nembed_dim = 16\nheads = 2\n{field} = {_toml(value)}\n" if field not in ("embed_dim", "heads")
                     else f"[model]\n{field} = {_toml(value)}\n")
    loaded = _library_ok(lambda: load_config_file(p), (field, value))
    if field == "unknown" and not binary:
        assert not loaded, "an unknown config key must be refused"
    if loaded:  # what loads is a valid config record
        assert isinstance(load_config_file(p), ModelConfig)


@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_recipes_corrupted(tmp_path, capsys, data):
    src = data.draw(st.sampled_from(sorted((ROOT / "models" / "recipes").glob("*.toml"))))
    p = tmp_path / "r.toml"
    shutil.copy(src, p)
    (_flip if data.draw(st.booleans()) else _truncate)(p, data)
    argv = ["train", "--recipe", p, "--out", tmp_path / "out", "--data-root", tmp_path / "no-data", "--epochs", "1", "--quiet"]
    rc, err = _cli(capsys, argv)
    _one_line_exit(rc, err, argv)
    assert rc == 2 and not (tmp_path / "out").exists()
