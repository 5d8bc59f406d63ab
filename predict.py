"""Classify images from the Hydra configs in conf/: `python predict.py inputs=[photo.jpg,photos/] [backbone=...]`."""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of logs

import hydra
from omegaconf import DictConfig

from pipeline.cli import one_line_errors

log = logging.getLogger("predict")


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from pipeline.predict import format_table, predict  # imported here so `--help` and config errors come fast

    with one_line_errors(cfg.paths.output_dir, log):
        records = predict(cfg)
    print(f"{format_table(records)}\npredictions: {cfg.paths.output_dir}/predictions.json")


if __name__ == "__main__":
    main()
