"""Classify images from the Hydra configs in conf/: `python predict.py inputs=[photo.jpg,photos/] [backbone=...]`."""

import logging

import hydra
from omegaconf import DictConfig

from pipeline.cli import one_line_errors, quiet_tensorflow_start

log = logging.getLogger("predict")


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    quiet_tensorflow_start()
    from pipeline.predict import format_table, predict  # imported here so `--help` and config errors come fast

    with one_line_errors(cfg.paths.output_dir, log):
        records = predict(cfg)
    print(f"{format_table(records)}\npredictions: {cfg.paths.output_dir}/predictions.json")


if __name__ == "__main__":
    main()
