"""The training configuration: frozen pydantic models read from YAML plus ``--set key=value`` overrides.

Every problem in a config is collected and reported at once in one ``ConfigError``; each line names the
key and says what to change (pydantic does the typing and range checks; ``_explain`` words its errors
for a YAML user). The YAML layout mirrors the models (see ``training/configs/multi30k_de_en.yaml``);
``TrainConfig.to_dict()`` writes the same layout back. Relative paths (``output_dir``, ``data.dir``,
``tokenizer.model``) are kept as written and resolve against the current working directory.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError, field_validator

from model.config import PRESETS, ModelConfig, preset

# ModelConfig fields the config file may not set: the vocabulary comes from the tokenizer, and the
# special ids are fixed by the SentencePiece training in training/spm.py.
_FIXED_MODEL_FIELDS = frozenset({"vocab_size", "pad_id", "unk_id", "bos_id", "eos_id"})

Int = Annotated[int, Strict()]  # YAML gives real integers; strict keeps true/false and 2.5 out
Positive = Annotated[int, Strict(), Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class ConfigError(ValueError):
    """One or more problems in a training config; ``problems`` lists them, the message shows them all."""

    def __init__(self, problems: Sequence[str], source: str = "training config") -> None:
        self.problems = list(problems)
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        super().__init__(f"invalid {source} ({count}):\n" + "\n".join(f"  - {p}" for p in self.problems))


class _Section(BaseModel):
    # Frozen and strict about keys; numbers may come as YAML strings ("1e-3"), ints where floats go.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class DataConfig(_Section):
    """Where the parallel text is and which pairs to train on (``training/data.py`` reads it)."""

    dir: str
    src: str = "de"
    tgt: str = "en"
    train: str = "train"  # split prefix: {dir}/{train}.{src}[.gz] or {dir}/{train}.tsv[.gz]
    valid: str = "val"
    format: Literal["auto", "plain", "tsv"] = "auto"
    max_len: Positive = 128  # subword tokens per side; longer train pairs are dropped
    max_len_ratio: float = Field(3.0, ge=0.0)  # 0 = off

    @field_validator("src", "tgt", "train", "valid")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value

    @field_validator("max_len_ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError(f"must be 0 (off) or at least 1, got {value}")
        return value

    @property
    def path(self) -> Path:
        return Path(self.dir).expanduser()


class TokenizerConfig(_Section):
    """The joint SentencePiece model: trained on the training text, or reused from ``model``."""

    vocab_size: Int = Field(8000, ge=5)  # ignored when ``model`` is given
    model: str | None = None
    model_type: Literal["unigram", "bpe", "char", "word"] = "unigram"
    character_coverage: float = Field(1.0, ge=0.0, le=1.0)
    input_sentence_size: Int = Field(2_000_000, ge=0)  # 0 = every sentence
    # Subword regularisation for training only (training/subword.py), unigram models: 0 = off, else the
    # smoothing of P(segmentation)**alpha over the sampling_nbest best segmentations (Kudo: 0.1 and 64).
    sampling_alpha: float = Field(0.0, ge=0.0)
    sampling_nbest: Int = Field(64, ge=2)

    @field_validator("model", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class ModelSection(_Section):
    """A ``model/config.py`` preset plus field overrides; the vocabulary size comes from the tokenizer."""

    preset: str = "small"
    overrides: dict[str, Any] = Field(default_factory=dict)

    def build(self, vocab_size: int) -> ModelConfig:
        return preset(self.preset, vocab_size, **self.overrides)


class OptimConfig(_Section):
    """The ``train:`` section: steps, batching, optimiser schedule, precision, logging, checkpoints."""

    max_steps: Positive = 20000
    batch_tokens: Positive = 4096  # per batch and rank: max of src/tgt padded tokens
    accum_steps: Positive = 1
    lr_scale: float = Field(1.0, gt=0.0)  # lr = lr_scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    warmup_steps: Positive = 4000
    cooldown: Fraction = 0.0  # last fraction of max_steps over which the lr falls linearly to ~0 (0 = off)
    label_smoothing: Fraction = 0.1
    r_drop_alpha: float = Field(0.0, ge=0.0)  # R-Drop: weight of the KL between two dropout passes (0 = off)
    clip_norm: float = Field(0.0, ge=0.0)  # 0 = off
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: Positive = 1000  # validation loss + BLEU (and a checkpoint)
    save_every: Int = Field(0, ge=0)  # extra checkpoints between evaluations (0 = only at evaluations)
    log_every: Positive = 50
    keep_last: Positive = 5
    average_last: Int = Field(5, ge=0)  # 0 or 1 = no averaging


class EvalConfig(_Section):
    """Validation decoding: the paper's beam 4 and GNMT length penalty 0.6."""

    beam_size: Positive = 4
    length_penalty: float = Field(0.6, ge=0.0)
    batch_size: Positive = 64  # sentences per search batch
    max_sentences: Int = Field(0, ge=0)  # 0 = the whole valid set


class TrainConfig(_Section):
    """Everything ``mt-train`` needs; stored whole in checkpoints and ``model.json``."""

    output_dir: str
    data: DataConfig
    seed: Int = Field(1, ge=0)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    train: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The YAML layout as plain JSON-able values; ``from_dict`` reads it back."""
        out = self.model_dump(mode="json")
        out["model"] = {"preset": self.model.preset, **self.model.overrides}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Validate and build from the YAML layout; no file-system checks (see ``load_config``)."""
        problems: list[str] = []
        config = _build(data, problems)
        if problems:
            raise ConfigError(problems)
        assert config is not None
        return config


_SECTIONS: dict[str, type[_Section]] = {
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "model": ModelSection,
    "train": OptimConfig,
    "eval": EvalConfig,
}


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None), apply ``--set`` overrides
    (``key.sub=value``, the value parsed as YAML), validate everything and check that the data
    directory and any given tokenizer model exist. Raises ``ConfigError`` listing every problem."""
    source = f"training config {path}" if path is not None else "training config"
    raw = _read_yaml(Path(path)) if path is not None else {}
    problems: list[str] = []
    for item in overrides:
        _apply_override(raw, item, problems)
    config = _build(raw, problems)
    problems.extend(_check_paths(raw))
    if problems:
        raise ConfigError(problems, source)
    assert config is not None
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"cannot read the config file: {error}; check --config"]) from error
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError([f"{path} is not valid YAML: {error}"]) from error
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path} must hold a mapping of sections, got {type(raw).__name__}"])
    return raw


def _apply_override(raw: dict[str, Any], item: str, problems: list[str]) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        problems.append(f"--set {item!r} is not key=value; write e.g. --set train.max_steps=1000")
        return
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        if node.get(part) is None:
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            problems.append(f"--set {key}: {where} is not a section, so it has no key {leaf!r}")
            return
        node = child
    try:
        node[leaf] = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problems.append(f"--set {key}: cannot parse {text!r} as a YAML value ({error.__class__.__name__})")


def _build(raw: dict[str, Any], problems: list[str]) -> TrainConfig | None:
    """Check every key and value of ``raw``, appending to ``problems``; build the config if none."""
    bad = len(problems)
    data = {key: value for key, value in raw.items() if key != "model"}
    data = {key: ({} if value is None and key in _SECTIONS else value) for key, value in data.items()}
    data.setdefault("data", {})  # so that a missing section reports its required keys
    model_raw = raw.get("model") or {}
    if isinstance(model_raw, dict):
        data["model"] = _model_section(model_raw, raw.get("tokenizer"), problems)
    else:
        problems.append(f"model must be a mapping of keys, got {type(model_raw).__name__} {model_raw!r}")
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as error:
        problems.extend(_explain(e) for e in error.errors(include_url=False))
        return None
    problems.extend(_cross_checks(config))
    return None if len(problems) > bad else config


def _explain(error: Any) -> str:
    """One pydantic error as a line that names the key and says what to change."""
    loc = [str(part) for part in error["loc"]]
    key, kind, value, ctx = ".".join(loc), error["type"], error.get("input"), error.get("ctx", {})
    got = f"got {value!r}"
    if kind == "missing":
        return f"{key} is required: set it in the YAML file or with --set {key}=..."
    if kind == "extra_forbidden":
        section = loc[0] if len(loc) > 1 else ""
        known = list((_SECTIONS[section] if section else TrainConfig).model_fields)
        return _unknown_key(loc[-1], known, f"{section}." if section else "")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key} must be a mapping of keys, got {type(value).__name__} {value!r}"
    if kind == "literal_error":
        return f"{key} must be one of {ctx['expected'].replace(' or ', ', ').join('[]')}, {got}".replace('"', "'")
    if kind == "greater_than" and ctx.get("gt") == 0:
        return f"{key} must be positive, {got}"
    if kind == "greater_than_equal":
        return f"{key} must be at least {ctx['ge']}, {got}"
    if kind in ("less_than", "less_than_equal"):
        bound = "1)" if kind == "less_than" else "1]"
        return f"{key} must be in [0, {bound}, {got}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{key} must be an integer, got {type(value).__name__} {value!r}"
    if kind in ("float_parsing", "float_type"):
        return f"{key} must be a number, got {type(value).__name__} {value!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"{key} must be true/false, got {type(value).__name__} {value!r}"
    if kind == "string_type":
        return f"{key} must be a string, got {type(value).__name__} {value!r}"
    if kind == "finite_number":
        return f"{key} must be a finite number, {got}"
    if kind == "value_error":
        return f"{key} {error['msg'].removeprefix('Value error, ')}"
    return f"{key}: {error['msg']}, {got}"


def _model_section(raw: dict[str, Any], tokenizer: Any, problems: list[str]) -> ModelSection:
    """The preset and its overrides, each override typed by ``ModelConfig`` and the whole checked by it."""
    fields = ModelConfig.__dataclass_fields__
    settable = [name for name in fields if name not in _FIXED_MODEL_FIELDS]
    name = raw.get("preset", "small")
    overrides = {key: value for key, value in raw.items() if key != "preset"}
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"model.preset {name!r} is unknown; choose one of {sorted(PRESETS)}{hint}")
    for key in sorted(set(overrides) & _FIXED_MODEL_FIELDS):
        problems.append(f"model.{key} cannot be set here: it comes from the tokenizer; remove it")
        del overrides[key]
    for key in [k for k in overrides if k not in settable]:
        problems.append(_unknown_key(key, ["preset", *settable], "model."))
        del overrides[key]
    bad = len(problems)
    hints = {name: f.type for name, f in fields.items()}
    for key, value in list(overrides.items()):
        try:
            overrides[key] = TypeAdapter(_resolve(hints[key])).validate_python(value)
        except ValidationError as error:
            problems.append(_explain({**error.errors(include_url=False)[0], "loc": ("model", key)}))
    if len(problems) == bad and name in PRESETS:
        vocab = tokenizer.get("vocab_size") if isinstance(tokenizer, dict) else None
        placeholder = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 4 else 8000
        try:
            preset(str(name), placeholder, **overrides)
        except ValueError as error:  # ModelConfig.problems(), all in one message
            detail = str(error).removeprefix("invalid model config: ")
            problems.append(f"model (preset {name!r} with your overrides): {detail}")
    return ModelSection(preset=str(name), overrides=overrides)


def _resolve(annotation: Any) -> Any:
    """ModelConfig's annotations are strings (``from __future__ import annotations``)."""
    if not isinstance(annotation, str):
        return annotation
    return {"int": Int, "float": float, "bool": bool, "str": str}.get(annotation, Any)


def _cross_checks(config: TrainConfig) -> list[str]:
    """Problems that involve two settings."""
    out: list[str] = []
    data, optim, tokenizer = config.data, config.train, config.tokenizer
    if data.src == data.tgt:
        out.append(f"data.src and data.tgt are both {data.src!r}; set them to two different languages")
    if optim.average_last > optim.keep_last:
        out.append(
            f"train.average_last ({optim.average_last}) exceeds train.keep_last ({optim.keep_last}); "
            "keep at least as many checkpoints as you average"
        )
    if tokenizer.sampling_alpha > 0 and tokenizer.model_type != "unigram":
        out.append(
            f"tokenizer.sampling_alpha needs model_type unigram (it samples unigram segmentations), not "
            f"{tokenizer.model_type!r}; set sampling_alpha to 0 or model_type to unigram"
        )
    if not math.isfinite(optim.lr_scale):
        out.append(f"train.lr_scale must be a finite number, got {optim.lr_scale!r}")
    return out


def _check_paths(raw: dict[str, Any]) -> list[str]:
    """File-system problems, checked on the raw values so they show up beside every other problem."""
    out = []
    data, tokenizer = raw.get("data"), raw.get("tokenizer")
    data_dir = data.get("dir") if isinstance(data, dict) else None
    if isinstance(data_dir, str) and not Path(data_dir).expanduser().is_dir():
        out.append(
            f"data.dir {data_dir!r} is not a directory (looked at {Path(data_dir).expanduser().resolve()}); "
            "relative paths resolve against the current directory: fix it or --set data.dir=PATH"
        )
    model = tokenizer.get("model") if isinstance(tokenizer, dict) else None
    if isinstance(model, str) and model and not Path(model).expanduser().is_file():
        out.append(f"tokenizer.model {model!r} does not exist; give an spm.model file or null to train one")
    return out


def _unknown_key(key: str, known: Sequence[str], prefix: str) -> str:
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    elsewhere = [
        f"{section}.{key}" for section, cls in _SECTIONS.items() if cls is not ModelSection and key in cls.model_fields
    ]
    if close:
        hint = f"; did you mean '{prefix}{close[0]}'?"
    elif elsewhere:
        hint = f"; it belongs under {elsewhere[0]!r}"
    else:
        hint = f"; known keys here: {', '.join(sorted(known))}"
    return f"unknown key '{prefix}{key}'{hint}"
