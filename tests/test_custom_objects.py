"""`import pipeline` registers the custom objects of saved models, whichever way Keras gets imported."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import CONF


def test_importing_tensorflow_before_keras_still_registers_the_custom_objects():
    """export.py imports TensorFlow first (quietly), which looks Keras up without loading it; the hook that
    registers pipeline's layers used to leave at that lookup, so every `python export.py` failed with
    `Could not locate class 'ImagePreprocessing'`."""
    code = ("import sys, pipeline\n"
            "assert 'keras' not in sys.modules\n"
            "import tensorflow, keras\n"
            "print(keras.saving.get_registered_object('pipeline>ImagePreprocessing'), keras.__loader__.__class__.__name__)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=CONF.parent, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "<class 'pipeline.layers.ImagePreprocessing'> SourceFileLoader" in result.stdout, result.stdout
