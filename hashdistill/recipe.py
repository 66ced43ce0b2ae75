"""Recipes: YAML files loaded with ``yaml.safe_load`` into typed dataclasses.

A recipe is data, never code: ``safe_load`` builds only plain Python values. Every field is
checked against the dataclass annotations; an unknown key, a wrong type or an out-of-range
value raises :class:`UserError` naming the field (``teacher.bits``) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from hashdistill.errors import UserError
from hashdistill.untrusted import short

RECIPE_FILE_NAME = "recipe.yaml"  # the resolved recipe inside a run directory
DATASETS = ("fashion-mnist", "digits", "imagefolder", "cifar10", "synthetic")
LOSS_NAMES = ("bernoulli_kd", "dth_mse", "code_bce", "dsh", "code_relation")  # hashdistill.distill.losses.LOSSES
# PyYAML follows YAML 1.1, where a float needs a dot: it reads `lr: 3e-4` as the string '3e-4'. Such text is
# accepted for float fields (and only text that is a plain decimal number: not 'nan' or 'inf').
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class OptimConfig:
    """One training phase: optimiser, learning-rate schedule and length."""

    epochs: int = 1
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, "epochs", "must be >= 0")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(0 <= self.warmup_epochs <= max(self.epochs, 0), "warmup_epochs", "must be in [0, epochs]")


@dataclass
class DataConfig:
    dataset: Literal["fashion-mnist", "digits", "imagefolder", "cifar10", "synthetic"] = "digits"
    root: str | None = None
    image_size: int = 32
    val_fraction: float = 0.1
    in_classes: list[int] | None = None
    ood_classes: list[int] = field(default_factory=list)
    augment: bool = False
    # Evaluation pre-processing (hashdistill.preprocessing): resize the shorter side to image_size / crop_pct, center
    # crop image_size. Default: 0.875 for image folders (timm's), 1 for the in-memory datasets (already square).
    crop_pct: float | None = None
    # Training augmentation of image folders (timm.data.create_transform): random resized crop of this area range,
    # horizontal flip with this probability, and timm's auto_augment policy string (e.g. rand-m9-mstd0.5-inc1).
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    auto_augment: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int | None = None  # null: min(8, CPU count) for image folders, 0 for the in-memory datasets
    train_limit: int | None = None
    test_limit: int | None = None
    # Semi-supervised training: only this fraction of the training images keeps its label (a fixed, seeded,
    # class-stratified choice, the same in every stage and run). The teacher and a labels-only student train on
    # the labelled images alone; a distilled student also learns from the rest through the teacher's codes.
    labelled_fraction: float = 1.0
    # A folder of images without labels (any layout; sub-folder names are ignored) that a distilled student
    # also learns from through the teacher's codes. Image folders only.
    unlabelled_root: str | None = None

    def __post_init__(self) -> None:
        _check(8 <= self.image_size <= 1024, "image_size", "must be in [8, 1024]")
        _check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        _check(self.batch_size >= 1 and self.eval_batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.num_workers is None or 0 <= self.num_workers <= 256, "num_workers", "must be in [0, 256] or null")
        _check(self.crop_pct is None or 0.05 <= self.crop_pct <= 1, "crop_pct", "must be in [0.05, 1] or null")
        _check(self.crop_pct in (None, 1) or self.dataset == "imagefolder", "crop_pct",
               "must be 1 or null for the in-memory datasets (they are square and already at image_size)")
        _check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale",
               "must be [min, max] with 0 < min <= max <= 1")
        _check(0 <= self.hflip <= 1, "hflip", "must be in [0, 1]")
        _check(self.auto_augment is None or re.fullmatch(r"[\w.-]{1,100}", self.auto_augment) is not None,
               "auto_augment", "must be a timm auto-augment policy such as rand-m9-mstd0.5-inc1, or null")
        for name in ("train_limit", "test_limit"):
            limit = getattr(self, name)
            _check(limit is None or limit >= 1, name, "must be >= 1 or null")
        _check(0 < self.labelled_fraction <= 1, "labelled_fraction", "must be in (0, 1]")
        _check(self.unlabelled_root is None or self.dataset == "imagefolder", "unlabelled_root",
               "needs data.dataset: imagefolder (use labelled_fraction to hold labels back in the other datasets)")
        if self.in_classes is not None:
            _check(len(self.in_classes) >= 2, "in_classes", "needs at least 2 classes")
            _check(not set(self.in_classes) & set(self.ood_classes), "ood_classes", "must not overlap in_classes")


@dataclass
class TeacherConfig:
    backbone: str = "resnet50"
    pretrained: bool = False
    weights: str | None = None  # a weights file to start the backbone from (safetensors, or .pth tensors only)
    bits: int = 16
    float_baseline: OptimConfig | None = None
    phase1: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=2))
    phase2: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=2))
    label_smoothing: float = 0.1
    bits_sweep: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(1 <= self.bits <= 1024, "bits", "must be in [1, 1024]")
        _check(all(1 <= k <= 1024 for k in self.bits_sweep), "bits_sweep", "every bit width must be in [1, 1024]")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")


# timm.create_model arguments a recipe or a checkpoint may not set: hashdistill sets them itself, or
# timm would read files or reach the hub with them (a checkpoint's metadata is untrusted input), or the
# model would be built where its weights cannot be loaded (device, dtype).
_RESERVED_MODEL_KWARGS = {"num_classes", "features_only", "checkpoint_path", "cache_dir", "device", "dtype",
                          "scriptable", "exportable", "no_jit"}


def unsafe_model_kwargs(kwargs: dict[str, Any]) -> str | None:
    """The first key of ``kwargs`` that must not reach ``timm.create_model``, or None."""
    return next((k for k in kwargs if k in _RESERVED_MODEL_KWARGS or k.startswith("pretrained")), None)


@dataclass
class StudentConfig:
    model: str = "mobilenetv3_small_100"
    pretrained: bool = False
    weights: str | None = None  # a weights file to start the backbone from (safetensors, or .pth tensors only)
    # Extra ``timm.create_model`` arguments, e.g. a thin resnet18: {channels: [20, 40, 80, 160]}.
    model_kwargs: dict[str, int | float | bool | str | list[int | float]] = field(default_factory=dict)
    train: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=2))
    losses: dict[str, float] = field(default_factory=lambda: {"bernoulli_kd": 1.0, "code_bce": 0.5})
    temperature: float = 2.0
    dsh_margin: float | None = None
    relation_temperature: float = 2.0  # code_relation: softmax(-d / tau) over Hamming distances d, tau in bits
    # Mixup between the images of a batch (Beta(mixup, mixup) weights; 0 = off), the teacher online on the mixed
    # image: "consistent teaching" (Beyer et al. 2022). A label survives only where both images share it.
    mixup: float = 0.0
    # Image folders with data.augment: each training image is limited to this many fixed views, whose teacher codes
    # are computed once (the in-memory datasets have exactly 50: every shift by up to 2 px, flipped or not).
    teacher_views: int = 8

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(self.relation_temperature > 0, "relation_temperature", "must be > 0")
        _check(1 <= self.teacher_views <= 1000, "teacher_views", "must be in [1, 1000]")
        _check(0 <= self.mixup <= 10, "mixup", "must be in [0, 10] (0 = off)")
        bad = unsafe_model_kwargs(self.model_kwargs)
        _check(not bad, "model_kwargs", f"'{bad}' is not allowed: hashdistill sets it, or timm reads files with it")
        _check(bool(self.losses), "losses", f"needs at least one of {', '.join(LOSS_NAMES)}")
        for name, weight in self.losses.items():
            _check(name in LOSS_NAMES, "losses", f"unknown loss '{name}'; allowed: {', '.join(LOSS_NAMES)}")
            _check(weight >= 0, f"losses.{name}", "weight must be >= 0")


@dataclass
class QuantizeConfig:
    threshold: float = 0.05
    target_sparsity: float | None = None
    scope: Literal["fc", "pointwise"] = "fc"  # pointwise: also every 1x1 conv of the body (the whole model shrinks)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    min_weights: int = 0  # only layers with at least this many weights (the wide ones hold the bytes)
    scale_init: Literal["mean", "one"] = "mean"
    train: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=1, lr=1e-4))
    scale_lr: float = 1e-2  # Wp, Wn train as logarithms: a relative step (Adam: about 1% per step)

    def __post_init__(self) -> None:
        _check(0 < self.threshold < 1, "threshold", "must be in (0, 1)")
        _check(self.target_sparsity is None or 0 < self.target_sparsity < 1, "target_sparsity", "must be in (0, 1)")
        _check(self.scale_lr > 0, "scale_lr", "must be > 0")
        _check(self.min_weights >= 0, "min_weights", "must be >= 0 (0 = every layer in scope)")


@dataclass
class ExportConfig:
    opset: int = 18
    file: str = "model.onnx"
    float_input: bool = False  # true: the graph takes pre-processed float32 [N, 3, S, S] instead of uint8 images

    def __post_init__(self) -> None:
        _check(self.opset >= 18, "opset", "must be >= 18")
        _check(re.fullmatch(r"[\w.-]+\.onnx", self.file or "") is not None and not self.file.startswith("."),
               "file", "must be a plain file name ending in .onnx (it is written into the run directory)")


@dataclass
class EvalConfig:
    top_k: int | None = None
    radius: int = 2

    def __post_init__(self) -> None:
        _check(self.top_k is None or self.top_k >= 1, "top_k", "must be >= 1 or null (all)")
        _check(self.radius >= 0, "radius", "must be >= 0")


@dataclass
class Recipe:
    name: str = "recipe"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")  # torch/numpy seeds are derived from it

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short stable hash of the resolved recipe (stored in checkpoints and ONNX metadata)."""
        return _digest(self.to_dict())

    def stage_digest(self, stage: str) -> str:
        """A short hash of what ``stage``'s output depends on (:data:`STAGE_INPUTS`): the data and the settings of
        that stage and of every stage before it. Not the seed, nor how data is loaded or the run evaluated: a
        teacher is the teacher of every recipe that agrees on its data and teacher settings, whatever the student
        seed, so runs may share it. A skipped stage compares its output's digest with this."""
        raw = self.to_dict()
        data = {k: v for k, v in raw["data"].items() if k not in _LOADING_FIELDS}
        if stage == "float-baseline":
            teacher = {k: raw["teacher"][k] for k in ("backbone", "pretrained", "weights", "float_baseline")}
            return _digest({"data": data, "teacher": teacher})
        sections = STAGE_INPUTS[stage]
        return _digest({"data": data, **{name: raw[name] for name in sections}})


STAGE_INPUTS = {"teacher": ("teacher",), "student": ("teacher", "student"),
                "quantize": ("teacher", "student", "quantize"), "export": ("teacher", "student", "quantize", "export")}
_LOADING_FIELDS = {"num_workers", "eval_batch_size", "test_limit"}  # how data is read or evaluated, not trained on


def _digest(value: dict[str, Any]) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def builtin_recipes() -> dict[str, Path]:
    """Name -> path of every recipe shipped in the package."""
    folder = resources.files("hashdistill.recipes")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a built-in recipe by name or a YAML file by path, then apply ``a.b=value`` overrides."""
    raw = _read_yaml(_locate(str(name_or_path)))
    for override in overrides or []:
        apply_override(raw, override)
    return recipe_from_dict(raw)


def recipe_from_dict(raw: Any) -> Recipe:
    """Validate a plain dict (as parsed from YAML) into a :class:`Recipe`."""
    return _convert(raw, Recipe, "recipe")


def data_config_from_dict(raw: Any) -> DataConfig:
    """Validate a data section read from a file (a checkpoint's ``data``) with the recipe's own rules."""
    return _convert(raw, DataConfig, "data")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def _locate(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        return path
    builtins = builtin_recipes()
    if name_or_path not in builtins:
        raise UserError(f"unknown recipe '{name_or_path}'; built-in recipes: {', '.join(sorted(builtins))} "
                        "(or give a path to a .yaml file)")
    return builtins[name_or_path]


MAX_RECIPE_BYTES = 256 * 1024  # the built-in recipes are under 2 KB
MAX_RECIPE_NODES = 10_000  # YAML values once aliases are expanded: a recipe has about 60


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes is too large for a recipe "
                            f"(at most {MAX_RECIPE_BYTES:,})")
        text = path.read_text()
        _check_expanded_size(yaml.compose(text, Loader=yaml.SafeLoader), path)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:  # one line: the problem and where, without PyYAML's multi-line excerpt
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML: {exc.problem or exc.context}{where}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise UserError(f"{path}: not a recipe (its YAML is nested too deeply)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read recipe ({exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a mapping of fields, got {type(raw).__name__}")
    return raw


def _check_expanded_size(root: yaml.Node | None, path: Path) -> None:
    """Refuse YAML whose aliases expand to more than MAX_RECIPE_NODES values (a "billion laughs" recipe),
    counting without building anything: a 500-byte file can otherwise expand to billions of values."""
    stack, seen = ([root] if root is not None else []), 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_RECIPE_NODES:
            raise UserError(f"{path}: not a recipe (its YAML expands to more than {MAX_RECIPE_NODES:,} values; "
                            "are aliases nested?)")
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(item for pair in node.value for item in pair)


def apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise UserError(f"--set expects field=value (for example teacher.bits=24), got '{override}'")
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


class _FieldError(UserError):
    """A value out of range, raised in ``__post_init__``; the loader re-raises it with the full field path.

    A UserError itself, so a config built directly (``DataConfig(**checkpoint_meta["data"])``) fails cleanly too.
    """

    def __init__(self, name: str, rule: str):
        super().__init__(f"recipe field '{name}': {rule}")
        self.name, self.rule = name, rule


def _check(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise _FieldError(name, rule)


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to ``annotation``, raising UserError that names ``where``."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return _convert_dataclass(value, annotation, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0])
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            choices = ", ".join(map(str, allowed))
            raise UserError(f"recipe field '{where}': {short(value)} is not allowed; choose one of {choices}")
        return value
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise UserError(f"recipe field '{where}': expected a list, got {_describe(value)}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise UserError(f"recipe field '{where}': expected a mapping, got {_describe(value)}")
        return {str(k): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    return _convert_scalar(value, annotation, where)


def _convert_scalar(value: Any, annotation: type, where: str) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        try:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value):
                return float(value)
        except OverflowError:
            raise UserError(f"recipe field '{where}': the value is too large for a number") from None
    elif annotation is str:
        if isinstance(value, str):
            return value
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    raise UserError(f"recipe field '{where}': expected {names.get(annotation, annotation)}, got {_describe(value)}")


def _convert_dataclass(value: Any, cls: type, where: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise UserError(f"recipe field '{where}': expected a mapping of fields, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    prefix = "" if where == "recipe" else f"{where}."
    unknown = sorted(set(map(str, value)) - fields)
    if unknown:
        allowed = ", ".join(sorted(fields))
        raise UserError(f"unknown recipe field '{prefix}{unknown[0]}'; allowed fields here: {allowed}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except _FieldError as exc:
        raise UserError(f"recipe field '{prefix}{exc.name}': {exc.rule}") from None


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {short(value)}" if value is not None else "null"
