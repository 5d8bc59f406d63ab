"""Config-driven Keras 3 pipeline: transfer learning, classification and FCN-32s on pretrained backbones.

`import pipeline` is all a user needs before `keras.saving.load_model(path)` (with the default
`safe_mode=True`) on any model this project saves: it registers every custom object a `.keras`
file names (layers, initializers, metrics). Importing Keras costs seconds (it loads TensorFlow), and
the command-line scripts and the ONNX / LiteRT prediction path must stay free of it; so when Keras
is not imported yet, the registration runs right after Keras's own import, wherever that happens.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


def register_custom_objects() -> None:
    """Imports the modules whose classes `.keras` files name; their decorators register them."""
    import pipeline.layers  # noqa: F401  ImagePreprocessing, PadToMultiple, CropOrPad, the bilinear layer
    import pipeline.segmentation_metrics  # noqa: F401  PixelAccuracy, in FCN runs' compile config


class _RegisterAfterKeras(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `keras` with the other finders and runs `register_custom_objects` once it is loaded.

    It stays in `sys.meta_path` until Keras is actually loaded: `import tensorflow` looks Keras up with
    `importlib.util.find_spec("keras")` without loading it, and a finder that left at the first lookup
    missed the real import that followed (`export.py` then could not load any model.keras).
    """

    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)  # the real module, not via sys.meta_path
        if spec is None or spec.loader is None:
            return spec
        spec.loader_state = spec.loader  # each spec remembers its own loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return spec.loader_state.create_module(spec)

    def exec_module(self, module):
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # Keras loads once
        loader = module.__spec__.loader_state
        module.__spec__.loader = module.__loader__ = loader  # Keras's own loader from here on
        loader.exec_module(module)
        register_custom_objects()


if "keras" in sys.modules:
    register_custom_objects()
elif not any(isinstance(finder, _RegisterAfterKeras) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterKeras())
