"""Export a training run for deployment: `python export.py run_dir=outputs/<date>/<time> [formats=[onnx]]`."""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of logs

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.cli import one_line_errors

log = logging.getLogger("export")


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from pipeline.export.run import export_run, summary  # imported here so `--help` and config errors come fast

    with one_line_errors(cfg.paths.output_dir, log, "; nothing was exported"):
        options = OmegaConf.to_container(cfg, resolve=True)
        del options["paths"]
        results = export_run(**options)
    print(f"{summary(results)}\nexported: {cfg.run_dir}/export")


if __name__ == "__main__":
    main()
