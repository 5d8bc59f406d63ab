"""Train a model from the Hydra configs in conf/: `python train.py [group=option ...] [key=value ...]`."""

import logging
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of logs

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import pipeline.schema  # noqa: F401  registers the types of conf/train.yaml's own keys
from pipeline.sweeps import JobFailed

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from pipeline.run import summary, train  # imported here so `--help` and config errors come fast

    try:
        metrics = train(cfg)
    except Exception as error:  # one clear line for the user; the traceback goes to error.txt
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        error_file = Path(cfg.paths.output_dir) / "error.txt"
        try:
            error_file.write_text(traceback.format_exc())
        except OSError:  # the disk may be the problem
            error_file = "error.txt: could not be written"
        log.error("%s: %s\n(traceback in %s; no metrics.json: this run did not finish)",
                  type(error).__name__, error, error_file)
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # in-process launchers: record it, go on with the next job
            raise JobFailed(f"{type(error).__name__}: {error} (traceback in {error_file})") from error
        sys.exit(1)
    print(f"{summary(metrics)}\nreports: {cfg.paths.output_dir}")
    return metrics.get(cfg.optimized_metric)  # what sweepers (Optuna) maximise


if __name__ == "__main__":
    main()
