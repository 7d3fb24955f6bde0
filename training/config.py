"""The training configuration: frozen dataclasses read from YAML plus ``--set key=value`` overrides.

Every problem in a config is collected and reported at once in one ``ConfigError``; each line names the
key and says what to change. The YAML layout mirrors the dataclasses (see
``training/configs/multi30k_de_en.yaml``); ``TrainConfig.to_dict()`` writes the same layout back.
Relative paths (``output_dir``, ``data.dir``, ``tokenizer.model``) are kept as written and resolve
against the current working directory.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from model.config import PRESETS, ModelConfig, preset

# ModelConfig fields the config file may not set: the vocabulary comes from the tokenizer, and the
# special ids are fixed by the SentencePiece training in training/spm.py.
_FIXED_MODEL_FIELDS = frozenset({"vocab_size", "pad_id", "unk_id", "bos_id", "eos_id"})


class ConfigError(ValueError):
    """One or more problems in a training config; ``problems`` lists them, the message shows them all."""

    def __init__(self, problems: Sequence[str], source: str = "training config") -> None:
        self.problems = list(problems)
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        super().__init__(f"invalid {source} ({count}):\n" + "\n".join(f"  - {p}" for p in self.problems))


# Field constraints live in the field metadata so that one loop checks every section.
def _required() -> Any:
    return field(metadata={"required": True})


def _positive(default: float) -> Any:
    return field(default=default, metadata={"positive": True})


def _at_least(default: float, low: float) -> Any:
    return field(default=default, metadata={"min": low})


def _fraction(default: float, one_allowed: bool = False) -> Any:
    return field(default=default, metadata={"fraction": True, "one_allowed": one_allowed})


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass(frozen=True)
class DataConfig:
    """Where the parallel text is and which pairs to train on (``training/data.py`` reads it)."""

    dir: str = _required()
    src: str = "de"
    tgt: str = "en"
    train: str = "train"  # split prefix: {dir}/{train}.{src}[.gz] or {dir}/{train}.tsv[.gz]
    valid: str = "val"
    format: str = _choice("auto", ("auto", "plain", "tsv"))
    max_len: int = _positive(128)  # subword tokens per side; longer train pairs are dropped
    max_len_ratio: float = _at_least(3.0, 0.0)  # 0 = off

    @property
    def path(self) -> Path:
        return Path(self.dir).expanduser()


@dataclass(frozen=True)
class TokenizerConfig:
    """The joint SentencePiece model: trained on the training text, or reused from ``model``."""

    vocab_size: int = _at_least(8000, 5)  # ignored when ``model`` is given
    model: str | None = None
    model_type: str = _choice("unigram", ("unigram", "bpe", "char", "word"))
    character_coverage: float = _fraction(1.0, one_allowed=True)
    input_sentence_size: int = _at_least(2_000_000, 0)  # 0 = every sentence
    # Subword regularisation for training only (training/subword.py), unigram models: 0 = off, else the
    # smoothing of P(segmentation)**alpha over the sampling_nbest best segmentations (Kudo: 0.1 and 64).
    sampling_alpha: float = _at_least(0.0, 0.0)
    sampling_nbest: int = _at_least(64, 2)


@dataclass(frozen=True)
class ModelSection:
    """A ``model/config.py`` preset plus field overrides; the vocabulary size comes from the tokenizer."""

    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self, vocab_size: int) -> ModelConfig:
        return preset(self.preset, vocab_size, **self.overrides)


@dataclass(frozen=True)
class OptimConfig:
    """The ``train:`` section: steps, batching, optimiser schedule, precision, logging, checkpoints."""

    max_steps: int = _positive(20000)
    batch_tokens: int = _positive(4096)  # per batch and rank: max of src/tgt padded tokens
    accum_steps: int = _positive(1)
    lr_scale: float = _positive(1.0)  # lr = lr_scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    warmup_steps: int = _positive(4000)
    label_smoothing: float = _fraction(0.1)
    r_drop_alpha: float = _at_least(0.0, 0.0)  # R-Drop: weight of the KL between two dropout passes (0 = off)
    clip_norm: float = _at_least(0.0, 0.0)  # 0 = off
    amp: str = _choice("auto", ("auto", "none", "bf16", "fp16"))
    device: str = _choice("auto", ("auto", "cpu", "cuda"))
    eval_every: int = _positive(1000)  # validation loss + BLEU (and a checkpoint)
    save_every: int = _at_least(0, 0)  # extra checkpoints between evaluations (0 = only at evaluations)
    log_every: int = _positive(50)
    keep_last: int = _positive(5)
    average_last: int = _at_least(5, 0)  # 0 or 1 = no averaging


@dataclass(frozen=True)
class EvalConfig:
    """Validation decoding: the paper's beam 4 and GNMT length penalty 0.6."""

    beam_size: int = _positive(4)
    length_penalty: float = _at_least(0.6, 0.0)
    batch_size: int = _positive(64)  # sentences per search batch
    max_sentences: int = _at_least(0, 0)  # 0 = the whole valid set


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``mt-train`` needs; stored whole in checkpoints and ``model.json``."""

    output_dir: str = _required()
    data: DataConfig
    seed: int = _at_least(1, 0)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The YAML layout as plain JSON-able values; ``from_dict`` reads it back."""
        out: dict[str, Any] = {"output_dir": self.output_dir, "seed": self.seed}
        for name in _SECTIONS:
            section = getattr(self, name)
            if isinstance(section, ModelSection):
                out[name] = {"preset": section.preset, **section.overrides}
            else:
                out[name] = {f.name: getattr(section, f.name) for f in fields(section)}
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


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "model": ModelSection,
    "train": OptimConfig,
    "eval": EvalConfig,
}
_TOP_LEVEL = ("output_dir", "seed")


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
    _unknown_keys(raw, (*_TOP_LEVEL, *_SECTIONS), "", problems)
    kwargs = _values(TrainConfig, raw, "", problems, only=_TOP_LEVEL)
    for name, cls in _SECTIONS.items():
        section = raw.get(name, {})
        if section is None:
            section = {}
        if not isinstance(section, dict):
            problems.append(f"{name} must be a mapping of keys, got {type(section).__name__} {section!r}")
            continue
        if cls is ModelSection:
            kwargs[name] = _model_section(section, raw.get("tokenizer"), problems)
        else:
            _unknown_keys(section, [f.name for f in fields(cls)], f"{name}.", problems)
            kwargs[name] = cls(**_values(cls, section, f"{name}.", problems))
    problems.extend(_cross_checks(kwargs))
    return None if problems else TrainConfig(**kwargs)


def _values(
    cls: type, raw: dict[str, Any], prefix: str, problems: list[str], only: Sequence[str] = ()
) -> dict[str, Any]:
    """Typed, range-checked constructor arguments for ``cls`` from ``raw`` (problems appended)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in fields(cls):
        if only and f.name not in only:
            continue
        key = prefix + f.name
        if f.name not in raw:
            if f.metadata.get("required"):
                problems.append(f"{key} is required: set it in the YAML file or with --set {key}=...")
                out[f.name] = None  # placeholder; the config is not built while problems remain
            elif f.default is not MISSING:
                out[f.name] = f.default
            continue
        value, problem = _coerce(raw[f.name], hints[f.name], key)
        problem = problem or _range_problem(value, f.metadata, key)
        if problem:
            problems.append(problem)
        out[f.name] = value
    return out


def _coerce(value: Any, hint: Any, key: str) -> tuple[Any, str | None]:
    """``value`` converted to the annotated type, or a problem saying what was expected."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None, None
    if float in allowed and isinstance(value, str):
        with contextlib.suppress(ValueError):  # PyYAML reads "1e-3" (no dot) as a string
            value = float(value)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if float in allowed and isinstance(value, float) and not math.isfinite(value):
        return value, f"{key} must be a finite number, got {value!r}"
    if any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed):
        return value, None
    names = " or ".join("null" if t is type(None) else _TYPE_WORDS.get(t, t.__name__) for t in allowed)
    return value, f"{key} must be {names}, got {type(value).__name__} {value!r}"


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}


def _range_problem(value: Any, meta: Any, key: str) -> str | None:
    if "choices" in meta and value not in meta["choices"]:
        return f"{key} must be one of {list(meta['choices'])}, got {value!r}"
    if meta.get("positive") and value <= 0:
        return f"{key} must be positive, got {value!r}"
    if "min" in meta and value < meta["min"]:
        return f"{key} must be at least {meta['min']}, got {value!r}"
    if meta.get("fraction") and not (0 <= value < 1 or (meta["one_allowed"] and value == 1)):
        return f"{key} must be in [0, 1{']' if meta['one_allowed'] else ')'}, got {value!r}"
    return None


def _model_section(raw: dict[str, Any], tokenizer: Any, problems: list[str]) -> ModelSection:
    hints = typing.get_type_hints(ModelConfig)
    settable = [name for name in hints if name not in _FIXED_MODEL_FIELDS]
    name = raw.get("preset", ModelSection.preset)
    overrides = {key: value for key, value in raw.items() if key != "preset"}
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"model.preset {name!r} is unknown; choose one of {sorted(PRESETS)}{hint}")
    for key in sorted(set(overrides) & _FIXED_MODEL_FIELDS):
        problems.append(f"model.{key} cannot be set here: it comes from the tokenizer; remove it")
        del overrides[key]
    _unknown_keys(overrides, ["preset", *settable], "model.", problems)
    bad = len(problems)
    for key in [k for k in overrides if k in hints]:
        overrides[key], problem = _coerce(overrides[key], hints[key], f"model.{key}")
        if problem:
            problems.append(problem)
    section = ModelSection(preset=str(name), overrides=overrides)
    if len(problems) == bad and name in PRESETS and set(overrides) <= set(settable):
        vocab = tokenizer.get("vocab_size") if isinstance(tokenizer, dict) else None
        placeholder = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 4 else 8000
        try:
            section.build(placeholder)
        except ValueError as error:  # ModelConfig.problems(), all in one message
            detail = str(error).removeprefix("invalid model config: ")
            problems.append(f"model (preset {name!r} with your overrides): {detail}")
    return section


def _cross_checks(kwargs: dict[str, Any]) -> list[str]:
    """Problems that involve two settings; skipped for sections that failed their own checks."""
    out: list[str] = []
    data, optim = kwargs.get("data"), kwargs.get("train")
    if isinstance(data, DataConfig):
        for side in ("src", "tgt", "train", "valid"):
            value = getattr(data, side)
            if isinstance(value, str) and not value.strip():
                out.append(f"data.{side} must be a non-empty string")
        if data.src == data.tgt:
            out.append(f"data.src and data.tgt are both {data.src!r}; set them to two different languages")
        if isinstance(data.max_len_ratio, float) and 0 < data.max_len_ratio < 1:
            out.append(f"data.max_len_ratio must be 0 (off) or at least 1, got {data.max_len_ratio}")
    tokenizer = kwargs.get("tokenizer")
    if isinstance(tokenizer, TokenizerConfig) and tokenizer.sampling_alpha > 0 and tokenizer.model_type != "unigram":
        out.append(
            f"tokenizer.sampling_alpha needs model_type unigram (it samples unigram segmentations), not "
            f"{tokenizer.model_type!r}; set sampling_alpha to 0 or model_type to unigram"
        )
    if isinstance(optim, OptimConfig):
        keep, average = optim.keep_last, optim.average_last
        if isinstance(keep, int) and isinstance(average, int) and average > keep:
            out.append(
                f"train.average_last ({average}) exceeds train.keep_last ({keep}); "
                "keep at least as many checkpoints as you average"
            )
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
    if isinstance(model, str) and not Path(model).expanduser().is_file():
        out.append(f"tokenizer.model {model!r} does not exist; give an spm.model file or null to train one")
    return out


def _unknown_keys(raw: dict[str, Any], known: Sequence[str], prefix: str, problems: list[str]) -> None:
    for key in raw:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        elsewhere = [
            f"{section}.{key}"
            for section, cls in _SECTIONS.items()
            if cls is not ModelSection and key in {f.name for f in fields(cls)}
        ]
        if close:
            hint = f"; did you mean '{prefix}{close[0]}'?"
        elif elsewhere:
            hint = f"; it belongs under {elsewhere[0]!r}"
        else:
            hint = f"; known keys here: {', '.join(sorted(known))}"
        problems.append(f"unknown key '{prefix}{key}'{hint}")
