"""Train a model from the Hydra configs in conf/: `python train.py [group=option ...] [key=value ...]`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of logs

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from pipeline.run import summary, train  # imported here so `--help` and config errors come fast

    metrics = train(cfg)
    print(f"{summary(metrics)}\nreports: {cfg.paths.output_dir}")
    return metrics.get(cfg.optimized_metric)  # what sweepers (Optuna) maximise


if __name__ == "__main__":
    main()
