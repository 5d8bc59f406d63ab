"""Train a model from the Hydra configs in conf/: `python train.py [group=option ...] [key=value ...]`."""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of logs

import hydra
from omegaconf import DictConfig

import pipeline.schema  # noqa: F401  registers the types of conf/train.yaml's own keys
from pipeline.cli import one_line_errors

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with one_line_errors(cfg.paths.output_dir, log, "; no metrics.json: this run did not finish"):
        pipeline.schema.check_run_config(cfg)  # before TensorFlow loads: a bad value is a quick one-line error
        from pipeline.run import summary, train  # here: `--help` and config errors come fast, Ctrl-C is one line
        metrics = train(cfg)
    if metrics:  # a non-chief worker of a multi-worker run writes no reports
        print(f"{summary(metrics)}\nreports: {cfg.paths.output_dir}")
    return metrics.get(cfg.optimized_metric)  # what sweepers (Optuna) maximise


if __name__ == "__main__":
    main()
