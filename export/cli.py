"""mt-export MODEL_DIR [--int8] [--fp16] [--force] [--valid-src FILE --valid-ref FILE] [--max-sentences N]."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export.onnx_export import ExportError
from export.pipeline import ExportInputError, ExportRequest, OutputExistsError, run_export
from export.validate import ValidationError
from model.model_dir import ModelDirError
from model.version import package_version

# Our packages log progress at INFO; third-party libraries (the exporter, quantization) stay at WARNING,
# and the exporter's routine warnings (missing torchvision ops, axis renames) are dropped.
OUR_LOGGERS = ("export", "model", "training")
QUIET_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mt-export",
        description="Export a model directory to ONNX (encoder + cached decoder step), validated against torch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("model_dir", type=Path, help="model directory written by mt-train")
    parser.add_argument("--int8", action="store_true", help="also write the int8 dynamically quantized variant (CPU)")
    parser.add_argument("--fp16", action="store_true", help="also write the fp16 variant (GPU)")
    parser.add_argument("--force", action="store_true", help="replace an existing MODEL_DIR/onnx/")
    parser.add_argument(
        "--valid-src",
        type=Path,
        help="validation sources (one sentence per line; .gz read too) for BLEU, decoded with model.json's defaults",
    )
    parser.add_argument(
        "--valid-ref", type=Path, help="validation references, line-aligned with --valid-src (.gz read too)"
    )
    parser.add_argument(
        "--max-sentences", type=int, help="beam-parity/BLEU sentences: at most N (default: all, or 64 random ones)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return parser.parse_args(argv)


def configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def summary(manifest: dict[str, Any], onnx_dir: Path) -> str:
    lines = [f"wrote {onnx_dir} ({', '.join(manifest['variants'])})"]
    evaluation = manifest["evaluation"]
    lines.append(f"evaluated on {evaluation['sentences']} sentences from {evaluation['sources']}")
    header = f"{'variant':8} {'max |Δ log p|':>14} {'tolerance':>10} {'same as torch':>15} {'BLEU':>7}  recommended"
    lines.append(header)
    for name, entry in manifest["variants"].items():
        beam, parity = entry["beam_parity"], entry["step_parity"]
        bleu = "-" if entry["bleu"] is None else f"{entry['bleu']:.2f}"
        lines.append(
            f"{name:8} {parity['max_abs_diff_log_probs']:>14.3g} {parity['tolerance']:>10g} "
            f"{beam['identical']:>7}/{beam['sentences']:<7} {bleu:>7}  "
            f"{'yes' if entry['recommended'] else 'no'} ({entry['reason']})"
        )
    if evaluation["torch_bleu"] is not None:
        lines.append(f"torch BLEU {evaluation['torch_bleu']:.2f}  {evaluation['bleu_signature']}")
    if evaluation.get("warning"):
        lines.append(f"WARNING: {evaluation['warning']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.quiet)
    variants = ("fp32", *(["int8"] if args.int8 else []), *(["fp16"] if args.fp16 else []))
    request = ExportRequest(
        model_dir=args.model_dir,
        variants=variants,
        force=args.force,
        valid_src=args.valid_src,
        valid_ref=args.valid_ref,
        max_sentences=args.max_sentences,
    )
    try:
        manifest = run_export(request)
    except (ModelDirError, OutputExistsError, ExportInputError, ExportError, ValidationError) as error:
        print(f"mt-export: error: {error}", file=sys.stderr)
        return 1
    print(summary(manifest, args.model_dir / "onnx"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
