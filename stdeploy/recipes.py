"""Training recipes: one TOML file per model and data set, holding the settings of the paper it
follows (``models/recipes/*.toml``).

A recipe has up to four tables; every key is checked against the dataclass it fills, so an
unknown key or a value of the wrong type is a :class:`ConfigError` naming the file and the key::

    [model]     preset = "<preset name or model .toml>", then ModelConfig keys that override it
                (without a preset: ModelConfig keys on ModelConfig's defaults)
    [data]      DataSettings: name, image_size, timesteps, binning, test_fraction
    [train]     TrainConfig keys (all but device and max_steps, which belong to the command line)
                plus the Augmentation keys augment and roll
    [finetune]  optional: the compensation fine-tune of ``stdeploy prune --recipe``: epochs,
                penalty_epochs and the same keys as [train] but seed

Resolution:

* ``[data] timesteps`` and ``image_size``, when given, set the model's T and input size (a
  ``[model]`` value that disagrees is an error); in_channels and num_classes always come from
  the data set when it is loaded (as without a recipe).
* ``[finetune]`` keys that are missing take ``CompensationConfig``'s defaults for epochs,
  penalty_epochs and lr, :data:`FINETUNE_INHERITED` from ``[train]``, and TrainConfig's defaults
  for the rest (no warmup, no mixing).
* Command-line values win over the file: first ``--model`` (replaces the whole ``[model]``
  table), then ``--set SECTION.KEY=VALUE`` (a TOML value, or a bare string), then the typed
  flags (``--lr``, ``--epochs``, ...). Each keeps its own name in error messages.

Without a file (plain ``stdeploy train``) the same resolution runs on an empty recipe, so every
default is the one the command had before recipes existed.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from .data import BINNINGS, DATASETS, DataSplit, load_dataset
from .errors import ConfigError
from .models import DEFAULT_PRESET, PRESETS, ModelConfig, resolve_config
from .prune import CompensationConfig
from .shipped import shipped_dir
from .train import TrainConfig

__all__ = ["Recipe", "DataSettings", "Augmentation", "Finetune", "Override", "RecipeCompensation",
           "load_recipe", "parse_set", "flag_overrides", "RECIPE_DIR", "FINETUNE_INHERITED"]

RECIPE_DIR = shipped_dir("recipes")  # the repository's models/recipes/, carried by the wheel
TABLES = ("model", "data", "train", "finetune")
COMMAND_LINE_ONLY = ("device", "max_steps")       # TrainConfig fields a recipe may not set
FINETUNE_OWN = ("epochs", "penalty_epochs", "lr")  # defaults from CompensationConfig
FINETUNE_INHERITED = ("batch_size", "weight_decay", "label_smoothing", "amp", "eval_batch_size",
                      "intrinsic_lr_scale", "augment", "roll")


@dataclass(frozen=True)
class DataSettings:
    name: str = "digits"             # one of stdeploy.data.DATASETS
    image_size: int | None = None    # H = W fed to the model; None: the model's (digits: native 8x8)
    timesteps: int | None = None     # T; None: the model's. DVS: frames per recording
    binning: str = "time"            # dvs: frames of equal "time" span or equal event "count"
    test_fraction: float = 0.0       # dvs: 0 = train/ and test/ folders; f > 0: last f of each class folder tests

    def __post_init__(self):
        problems = []
        if self.name not in DATASETS:
            problems.append(f"name must be one of {', '.join(DATASETS)}, got {self.name!r}")
        for key in ("image_size", "timesteps"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and value >= 1):
                problems.append(f"{key} must be a positive integer, got {value!r}")
        if self.binning not in BINNINGS:
            problems.append(f"binning must be one of {', '.join(BINNINGS)}, got {self.binning!r}")
        if not 0 <= self.test_fraction < 1:
            problems.append(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.name != "dvs" and (self.binning != "time" or self.test_fraction):
            problems.append(f"binning and test_fraction apply to dvs only, not to {self.name}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class Augmentation:
    augment: bool = False            # random crop (4 px padding) + flip for images, flip for DVS frames
    roll: int = 0                    # random translation by up to this many pixels, wrapping around (DVS)

    def __post_init__(self):
        if not (isinstance(self.roll, int) and self.roll >= 0):
            raise ConfigError(f"roll must be an integer >= 0, got {self.roll!r}")
        if self.roll and not self.augment:
            raise ConfigError(f"roll = {self.roll} is an augmentation: set augment = true")


@dataclass(frozen=True)
class Finetune:
    """The fine-tune phases of ``stdeploy prune``: ``penalty_epochs`` with the pruning penalty,
    then ``epochs`` of compensation, both with ``train`` (its ``epochs`` is replaced per phase)."""
    epochs: int
    penalty_epochs: int
    train: TrainConfig
    augmentation: Augmentation


@dataclass(frozen=True)
class RecipeCompensation(CompensationConfig):
    """:class:`CompensationConfig` whose fine-tunes use every TrainConfig setting of the recipe
    (warmup, schedule, weight decay, label smoothing, mixing), not only lr and batch size."""
    base: TrainConfig = field(default_factory=TrainConfig)

    def train_config(self, epochs: int) -> TrainConfig:
        return dataclasses.replace(self.base, epochs=epochs, batch_size=self.batch_size, lr=self.lr,
                                   intrinsic_lr_scale=self.intrinsic_lr_scale, seed=self.seed, device=self.device)


@dataclass(frozen=True)
class Override:
    """One value from the command line: ``section.key = value``, reported as ``origin``."""
    section: str
    key: str
    value: object
    origin: str


@dataclass(frozen=True)
class Recipe:
    source: str                      # the file, or "defaults"
    model: ModelConfig               # data's T and image size applied; in_channels/num_classes as written
    data: DataSettings
    train: TrainConfig
    augmentation: Augmentation
    finetune: Finetune
    preset: str | None = None
    overrides: tuple[Override, ...] = ()

    def load_data(self, root: str | os.PathLike | None, *, finetune: bool = False,
                  image_size: int | None = None, timesteps: int | None = None) -> DataSplit:
        """The data set with this recipe's binning, split and augmentation (the fine-tune's with
        ``finetune``); ``image_size``/``timesteps`` default to the model's."""
        aug = self.finetune.augmentation if finetune else self.augmentation
        size = self.data.image_size or (image_size or self.model.image_size if self.data.name != "digits" else None)
        return load_dataset(self.data.name, root, image_size=size, timesteps=timesteps or self.model.timesteps,
                            augment=aug.augment, roll=aug.roll, seed=self.train.seed, binning=self.data.binning,
                            test_fraction=self.data.test_fraction)

    def meta(self) -> dict:
        """What a checkpoint records about the recipe (nothing for the defaults)."""
        if self.source == "defaults" and not self.overrides:
            return {}
        return {"recipe": {"source": self.source, "overrides": {f"{o.section}.{o.key}": o.value for o in self.overrides}}}


# ----------------------------------------------------------------------------- command line
def parse_set(items: Iterable[str] | None) -> list[Override]:
    """``--set SECTION.KEY=VALUE`` strings -> overrides. VALUE is read as a TOML value
    (``3``, ``1e-3``, ``true``, ``"x"``); anything TOML cannot read is taken as a string."""
    overrides = []
    for item in items or ():
        origin = f"--set {item}"
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not (sep and dot and section and key):
            raise ConfigError(f"{origin}: expected SECTION.KEY=VALUE, e.g. train.lr=1e-3")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        overrides.append(Override(section, key.strip(), value, origin))
    return overrides


def flag_overrides(values: Mapping[str, object], flags: Mapping[str, tuple[str, ...]]) -> list[Override]:
    """Overrides from typed flags that were given (value not None): ``{dest: ("section.key", ...)}``."""
    overrides = []
    for dest, targets in flags.items():
        value = values.get(dest)
        if value is None:
            continue
        for target in targets:
            section, key = target.split(".")
            overrides.append(Override(section, key, value, "--" + dest.replace("_", "-")))
    return overrides


# ----------------------------------------------------------------------------- loading
def load_recipe(path: str | os.PathLike | None = None, overrides: Iterable[Override] = (), *,
                model: str | None = None) -> Recipe:
    """Read and validate recipe ``path`` (None: the defaults of ``stdeploy train``), apply
    ``model`` (a preset name or model file replacing ``[model]``) and the command-line
    ``overrides`` in order."""
    tables: dict[str, dict] = {name: {} for name in TABLES}
    origins: dict[tuple[str, str], str] = {}
    source, base_dir = "defaults", Path.cwd()
    if path is not None:
        source, base_dir = str(path), Path(path).resolve().parent
        for name, table in _read_toml(Path(path)).items():
            tables[name] = dict(table)
            origins.update({(name, key): source for key in table})
    if path is None or model is not None:
        tables["model"] = {"preset": model or DEFAULT_PRESET}
        origins = {k: v for k, v in origins.items() if k[0] != "model"}
        origins[("model", "preset")] = "--model" if model is not None else "defaults"
        base_dir = Path.cwd()
    overrides = tuple(overrides)
    for o in overrides:
        if o.section not in TABLES:
            raise ConfigError(f"{o.origin}: unknown table [{o.section}]; known: {', '.join(TABLES)}")
        tables[o.section][o.key] = o.value
        origins[(o.section, o.key)] = o.origin
    return _build(tables, origins, source, base_dir, overrides)


def _read_toml(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:  # a binary file is not a recipe either
        raise ConfigError(f"{path}: cannot parse: {str(err).splitlines()[0][:200]}") from None
    for name, table in doc.items():
        if name not in TABLES:
            raise ConfigError(f"{path}: unknown key or table {name!r} at the top level; known tables: {', '.join(TABLES)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {name} must be a table ([{name}]), got {table!r}")
    if "data" not in doc or "name" not in doc["data"]:
        raise ConfigError(f"{path}: [data] name is required (one of {', '.join(DATASETS)})")
    return doc


def _build(tables, origins, source, base_dir, overrides) -> Recipe:
    def where(section: str, keys: Iterable[str] | None = None) -> str:
        keys = tables[section] if keys is None else keys
        found = sorted({origins.get((section, k), source) for k in keys}) or [source]
        return " + ".join(found)

    def checked(section: str, cls, allowed: Iterable[str], extra: Mapping[str, type] | None = None) -> dict:
        """The table's values, each checked against the type of ``cls``'s field (or ``extra``)."""
        hints = {**typing.get_type_hints(cls), **(extra or {})}
        allowed = tuple(allowed)
        out = {}
        for key, value in tables[section].items():
            if key not in allowed:
                raise ConfigError(f"{where(section, [key])}: unknown key [{section}] {key}; known keys: {', '.join(sorted(allowed))}")
            out[key] = _typed(value, hints[key], f"{where(section, [key])}: [{section}] {key}")
        return out

    def construct(section: str, cls, keys: Iterable[str] | None = None, **values):
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{where(section, keys)}: [{section}] {err}") from None

    train_fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in COMMAND_LINE_ONLY]
    aug_fields = [f.name for f in dataclasses.fields(Augmentation)]

    # [data]
    data_values = checked("data", DataSettings, [f.name for f in dataclasses.fields(DataSettings)])
    data = construct("data", DataSettings, **data_values)

    # [model]
    model_values = checked("model", ModelConfig, [f.name for f in dataclasses.fields(ModelConfig)] + ["preset"],
                           extra={"preset": str})
    preset = model_values.pop("preset", None)
    base = ModelConfig()
    if preset is not None:
        spec = preset
        if preset not in PRESETS and (base_dir / preset).is_file():
            spec = str(base_dir / preset)
        try:
            base = resolve_config(spec)
        except ConfigError as err:
            raise ConfigError(f"{where('model', ['preset'])}: [model] preset: {err}") from None
    for key in ("timesteps", "image_size"):
        wanted = getattr(data, key)
        if wanted is None:
            continue
        if key in model_values and model_values[key] != wanted:
            raise ConfigError(f"{where('model', [key])} / {where('data', [key])}: [model] {key} = {model_values[key]} "
                              f"disagrees with [data] {key} = {wanted}; set it in [data] only")
        model_values[key] = wanted
    try:
        model = base.replace(**model_values)
    except ConfigError as err:
        raise ConfigError(f"{where('model')}: [model] {err}") from None

    # [train]
    train_values = checked("train", TrainConfig, train_fields + aug_fields, extra={"augment": bool, "roll": int})
    augmentation = construct("train", Augmentation, [k for k in train_values if k in aug_fields],
                             **{k: train_values.pop(k) for k in aug_fields if k in train_values})
    train = construct("train", TrainConfig, **train_values)

    # [finetune]
    ft_allowed = [k for k in train_fields if k != "seed"] + aug_fields + ["penalty_epochs"]
    ft_values = checked("finetune", TrainConfig, ft_allowed, extra={"augment": bool, "roll": int, "penalty_epochs": int})
    comp = {f.name: f.default for f in dataclasses.fields(CompensationConfig)}
    inherited = {**dataclasses.asdict(train), **dataclasses.asdict(augmentation)}
    for key in FINETUNE_OWN:
        ft_values.setdefault(key, comp[key])
    for key in FINETUNE_INHERITED:
        ft_values.setdefault(key, inherited[key])
    ft_aug = construct("finetune", Augmentation, **{k: ft_values.pop(k) for k in aug_fields})
    penalty_epochs = ft_values.pop("penalty_epochs")
    if not (isinstance(penalty_epochs, int) and penalty_epochs >= 0):
        raise ConfigError(f"{where('finetune', ['penalty_epochs'])}: [finetune] penalty_epochs must be an integer >= 0, got {penalty_epochs!r}")
    ft_train = construct("finetune", TrainConfig, **ft_values, seed=train.seed)
    finetune = Finetune(epochs=ft_train.epochs, penalty_epochs=penalty_epochs, train=ft_train, augmentation=ft_aug)

    return Recipe(source=source, model=model, data=data, train=train, augmentation=augmentation, finetune=finetune,
                  preset=preset, overrides=overrides)


def _typed(value, hint, where: str):
    """``value`` if it fits the type ``hint`` (int, float, bool, str or ``X | None``); an int
    is accepted for a float. Otherwise a ConfigError naming ``where``."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None):
            continue
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ConfigError(f"{where}: expected {names}, got {value!r}")
