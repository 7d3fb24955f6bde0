"""mt-train: train the Transformer from a YAML config into a model directory."""

from __future__ import annotations

import argparse
import logging
import sys

from model.version import package_version
from training.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mt-train",
        description="Train the Transformer of 'Attention Is All You Need' on parallel text and write a model "
        "directory (model.json, spm.model, weights.safetensors). Run under torchrun for DDP.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--config", required=True, help="YAML config, e.g. training/configs/multi30k_de_en.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set train.max_steps=20 --set data.dir=DIR",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in output_dir/checkpoints"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="start over in an output_dir that holds another run's model or checkpoints (deletes them)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"mt-train: {error}", file=sys.stderr)
        return 2
    # Imported here so that config errors come back instantly, before torch loads.
    from training.data import DataError
    from training.spm import SpmError
    from training.trainer import Trainer, TrainingError

    try:
        trainer = Trainer(cfg, resume=args.resume, force=args.force).prepare()
        if trainer.resume_from is not None:
            print(f"mt-train: resumed from {trainer.resume_from} at step {trainer.progress.step}", file=sys.stderr)
        trainer.run()
        if trainer.dist.is_main:
            out = trainer.finalize()
            print(f"mt-train: wrote model directory {out}", file=sys.stderr)
    except (DataError, SpmError, TrainingError) as error:
        print(f"mt-train: {error}", file=sys.stderr)
        return 2
    finally:
        from training.distributed import shutdown

        if "trainer" in locals():
            shutdown(trainer.dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
