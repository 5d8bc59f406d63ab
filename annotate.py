"""Annotate images with an ImageNet classifier run fully convolutionally: `python annotate.py inputs=[photo.jpg]`."""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of logs

import hydra
from omegaconf import DictConfig

from pipeline.cli import one_line_errors

log = logging.getLogger("annotate")


@hydra.main(version_base="1.3", config_path="conf", config_name="annotate")
def main(cfg: DictConfig) -> None:
    from pipeline.annotate import annotate, format_classes  # imported here so `--help` and config errors come fast

    with one_line_errors(cfg.paths.output_dir, log):
        records = annotate(cfg)
    print(f"{format_classes(records)}\nannotations: {cfg.paths.output_dir}")


if __name__ == "__main__":
    main()
