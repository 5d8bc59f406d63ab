"""Train a model from the Hydra configs in conf/: `python train.py [group=option ...] [key=value ...]`."""

import logging

import hydra
from omegaconf import DictConfig

import pipeline.schema  # noqa: F401  registers the types of conf/train.yaml's own keys
from pipeline.checks import check_train_config
from pipeline.cli import one_line_errors, quiet_tensorflow_start
from pipeline.runs import check_not_busy

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with one_line_errors(cfg.paths.output_dir, log, "; no metrics.json: this run did not finish"):
        check_not_busy(cfg.paths.output_dir)  # another live run's folder: refused before anything else
        check_train_config(cfg)  # config and data root first: a mistake is reported in a second
        quiet_tensorflow_start()
        from pipeline.run import summary, train  # TensorFlow is imported here, after the checks

        metrics = train(cfg)
    if metrics:  # a non-chief worker of a multi-worker run writes no reports
        print(f"{summary(metrics)}\nreports: {cfg.paths.output_dir}")
    return metrics.get(cfg.optimized_metric)  # what sweepers (Optuna) maximise


if __name__ == "__main__":
    main()
