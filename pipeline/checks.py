"""Checks of a composed config that need no TensorFlow: run first, so a typo is reported in a second.

Importing TensorFlow takes several seconds; a missing `dataset.root` or a malformed `image_size`
should not wait for it. Everything here reads only the config and the file system.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

# Where a user sets a value that tasks read through interpolation: `task.dataset` is `${dataset}`.
_USER_KEYS = {"task.dataset.": "dataset.", "task.backbone.": "backbone."}


def image_size_pair(value) -> list[int]:
    """`[height, width]` from `image_size`: one int means a square, `160` -> `[160, 160]`.

    Args:
        value: an int, or a list / tuple of two ints.

    Raises:
        ValueError: anything else, with the two accepted forms.
    """
    if isinstance(value, (ListConfig, list, tuple)):
        sides = list(value)
    else:
        sides = [value, value]
    if len(sides) != 2 or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0
                                  for side in sides):
        shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        raise ValueError(f"image_size must be one positive int for a square (image_size=160) or "
                         f"[height, width] (image_size=[160,224]); got {shown!r}.")
    return [int(side) for side in sides]


def user_key(key: str) -> str:
    """The key a user writes on the command line for a config key (`task.dataset.root` -> `dataset.root`)."""
    for inner, outer in _USER_KEYS.items():
        if key.startswith(inner):
            return outer + key[len(inner):]
    return key


def check_train_config(cfg: DictConfig) -> None:
    """Stops a run whose config cannot work, before anything slow is imported or built.

    Checks that every mandatory value (`???`) is set, normalises `image_size` (one int -> a square,
    in place), and that a dataset root given as a path exists.

    Args:
        cfg: the composed `conf/train.yaml`.

    Raises:
        ValueError: a missing value or a malformed `image_size`.
        FileNotFoundError: a dataset root that is not a folder.
    """
    missing = sorted(user_key(key) for key in OmegaConf.missing_keys(cfg))
    if missing:
        hints = {"dataset.root": " (the folder of your data, e.g. dataset.root=/data/birds)"}
        listing = ", ".join(f"{key}{hints.get(key, '')}" for key in missing)
        raise ValueError(f"Missing mandatory value: {listing}. Set it on the command line: "
                         f"python train.py ... {missing[0]}=VALUE.")
    cfg.image_size = image_size_pair(cfg.image_size)
    root = cfg.dataset.get("root") if isinstance(cfg.get("dataset"), DictConfig) else None
    if isinstance(root, str) and not Path(root).expanduser().is_dir():
        raise FileNotFoundError(
            f"Dataset root {Path(root).expanduser().resolve()} does not exist or is not a folder. Set "
            "dataset.root to your data's folder (datasets/README.md shows each dataset's layout)."
        )
