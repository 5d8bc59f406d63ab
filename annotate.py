"""Annotate images with an ImageNet classifier run fully convolutionally: `python annotate.py inputs=[photo.jpg]`."""

import logging

import hydra
from omegaconf import DictConfig

from pipeline.cli import one_line_errors, quiet_tensorflow_start

log = logging.getLogger("annotate")


@hydra.main(version_base="1.3", config_path="conf", config_name="annotate")
def main(cfg: DictConfig) -> None:
    quiet_tensorflow_start()
    from pipeline.annotate import annotate, format_classes  # imported here so `--help` and config errors come fast

    with one_line_errors(cfg.paths.output_dir, log):
        records = annotate(cfg)
    print(f"{format_classes(records)}\nannotations: {cfg.paths.output_dir}")


if __name__ == "__main__":
    main()
