"""mt-serve refuses model dirs it cannot serve, naming the file, before it starts a server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import load_settings, parse_args
from service.cli import main as mt_serve


@pytest.fixture
def model_copy(served_model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(served_model_dir, target)
    return target


def test_missing_model_dir_exits_non_zero_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--model", str(missing), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr


def _corrupt_json(model: Path) -> Path:
    (model / "model.json").write_text("{not json", encoding="utf-8")
    return model / "model.json"


def _no_onnx(model: Path) -> Path:
    shutil.rmtree(model / "onnx")
    return model / "onnx" / "manifest.json"


def _changed_graph(model: Path) -> Path:
    with (model / "onnx" / "decoder.onnx").open("ab") as f:
        f.write(b"garbage")
    return model / "onnx" / "decoder.onnx"


def _broken_tokenizer(model: Path) -> Path:
    (model / "spm.model").write_bytes(b"not a sentencepiece model")
    return model / "spm.model"


@pytest.mark.parametrize("damage", [_corrupt_json, _no_onnx, _changed_graph, _broken_tokenizer])
def test_corrupt_model_dir_exits_non_zero_naming_the_file(model_copy: Path, damage, capsys) -> None:
    named = damage(model_copy)
    assert mt_serve(["--model", str(model_copy)]) == 1
    err = capsys.readouterr().err
    assert str(named) in err
    if damage is _no_onnx:
        assert "mt-export" in err


def test_two_models_for_one_pair_are_refused(model_copy: Path, served_model_dir: Path, capsys) -> None:
    meta = json.loads((model_copy / "model.json").read_text(encoding="utf-8"))
    assert (meta["source_lang"], meta["target_lang"]) == ("src", "tgt")
    assert mt_serve(["--model", str(served_model_dir), "--model", str(model_copy)]) == 1
    assert "both translate src→tgt" in capsys.readouterr().err


def test_port_zero_is_kept_and_unset_flags_leave_the_settings_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MT_PORT", "9000")
    assert load_settings(parse_args(["--port", "0"])).port == 0  # 0: any free port, not "unset"
    assert load_settings(parse_args([])).port == 9000
