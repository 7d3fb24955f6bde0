"""mt-export from the command line: the manifest it writes, refusing to overwrite, and errors that say what to do."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from export.cli import main as mt_export
from export.cli import summary
from export.pipeline import MIN_USEFUL_BLEU, _recommendation, read_lines, useless_model_warning
from export.validate import PARITY_SHAPES, TOLERANCES
from model.manifest import changed_files, read_manifest


def test_manifest_holds_hashes_versions_and_parity_figures(exported_model_dir: Path) -> None:
    onnx_dir = exported_model_dir / "onnx"
    manifest = read_manifest(onnx_dir)
    assert changed_files(onnx_dir, manifest) == []
    assert set(manifest["files"]) == {f"{g}{s}.onnx" for g in ("encoder", "decoder") for s in ("", ".int8", ".fp16")}
    assert manifest["exporter"]["opset"] >= 17
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["exporter"]["versions"])
    for name, entry in manifest["variants"].items():
        parity = entry["step_parity"]
        assert parity["passed"] and parity["tolerance"] == TOLERANCES[name]
        shapes = [(c["batch"], c["src_len"], c["past_len"]) for c in parity["cases"]]
        assert shapes == list(PARITY_SHAPES)
        assert parity["max_abs_diff_log_probs"] <= TOLERANCES[name]
        assert entry["bleu"] is not None
    fp32 = manifest["variants"]["fp32"]
    assert fp32["beam_parity"]["identical"] == fp32["beam_parity"]["sentences"] == manifest["evaluation"]["sentences"]
    assert fp32["beam_parity"]["differences"] == []
    assert manifest["evaluation"]["bleu_signature"].startswith("nrefs:1")
    int8 = manifest["variants"]["int8"]
    assert int8["recommended"] == (fp32["bleu"] - int8["bleu"] <= 0.5)


def test_refuses_to_overwrite_without_force(exported_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest_path = exported_model_dir / "onnx" / "manifest.json"
    before = manifest_path.read_bytes()
    assert mt_export([str(exported_model_dir)]) == 1
    err = capsys.readouterr().err
    assert "onnx already exists" in err and "add --force" in err
    assert manifest_path.read_bytes() == before


def test_bad_arguments_fail_before_touching_the_export(
    exported_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (exported_model_dir / "onnx" / "manifest.json").read_bytes()
    src = tmp_path / "valid.src"
    src.write_text("w01 w02\nw03\n", encoding="utf-8")
    args = [str(exported_model_dir), "--force", "--valid-src", str(src), "--valid-ref", str(tmp_path / "missing")]
    assert mt_export(args) == 1
    assert "validation file not found" in capsys.readouterr().err
    assert (exported_model_dir / "onnx" / "manifest.json").read_bytes() == before
    assert mt_export([str(tmp_path / "no_model")]) == 1
    assert "model directory not found" in capsys.readouterr().err


def test_validation_files_may_be_gzipped(tmp_path: Path) -> None:
    lines = ["Ein Mann fährt Fahrrad.", "Zwei Hunde."]
    plain, packed = tmp_path / "valid.de", tmp_path / "valid.de.gz"
    plain.write_text("\n".join(lines) + "\n", encoding="utf-8")
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_lines(packed) == read_lines(plain) == lines


def test_a_useless_model_is_flagged_and_int8_never_recommended_for_it(exported_model_dir: Path) -> None:
    # The trained copy model is useful: no warning in its manifest.
    assert read_manifest(exported_model_dir / "onnx")["evaluation"]["warning"] is None
    assert useless_model_warning(MIN_USEFUL_BLEU) is None
    warning = useless_model_warning(0.4)
    assert warning is not None and "0.40" in warning and "does not translate" in warning
    # int8 as good as fp32, but fp32 itself scores 0.4: not recommended, and the reason says why.
    recommended, reason = _recommendation("int8", 0.4, 0.4)
    assert not recommended and "not useful" in reason
    assert _recommendation("int8", 30.0, 30.2) == (True, "within 0.5 BLEU of fp32 (-0.20)")
    manifest = read_manifest(exported_model_dir / "onnx")
    manifest["evaluation"]["warning"] = warning
    assert summary(manifest, exported_model_dir / "onnx").splitlines()[-1] == f"WARNING: {warning}"


def test_validation_decodes_with_the_model_dirs_decoding_defaults(
    trained_model_dir: Path, copy_task_dir: Path, tmp_path: Path
) -> None:
    """The BLEU that MT_VARIANT=auto compares is measured with the decoding the service uses: model.json's."""
    model_dir = tmp_path / "tuned"
    shutil.copytree(trained_model_dir, model_dir, ignore=shutil.ignore_patterns("onnx", "checkpoints", "*.png"))
    meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    meta["decoding"] = {"beam_size": 2, "length_penalty": 1.1, "max_length_offset": 7}
    (model_dir / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    args = [str(model_dir), "--max-sentences", "8"]
    assert (
        mt_export(
            [*args, "--valid-src", str(copy_task_dir / "test.src"), "--valid-ref", str(copy_task_dir / "test.tgt")]
        )
        == 0
    )
    search = read_manifest(model_dir / "onnx")["evaluation"]["search"]
    assert search == {"beam_size": 2, "length_penalty": 1.1, "max_length_offset": 7}
