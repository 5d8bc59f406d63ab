"""Annotate images with an ImageNet classifier run fully convolutionally: `python annotate.py inputs=[photo.jpg]`."""

import logging
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of logs

import hydra
from omegaconf import DictConfig

log = logging.getLogger("annotate")


@hydra.main(version_base="1.3", config_path="conf", config_name="annotate")
def main(cfg: DictConfig) -> None:
    from pipeline.annotate import annotate, format_classes  # imported here so `--help` and config errors come fast

    try:
        records = annotate(cfg)
    except Exception as error:  # one clear line for the user; the traceback goes to error.txt, as train.py
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        error_file = Path(cfg.paths.output_dir) / "error.txt"
        error_file.write_text(traceback.format_exc())
        log.error("%s: %s\n(traceback in %s)", type(error).__name__, error, error_file)
        sys.exit(1)
    print(f"{format_classes(records)}\nannotations: {cfg.paths.output_dir}")


if __name__ == "__main__":
    main()
