"""The models are `keras.layers` and `keras.ops` alone, so they train under JAX without TensorFlow.

That is how bench/gpu_throughput.py runs them on the GPU machines, where TensorFlow is not installed.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fcn32s_and_the_transfer_head_train_under_jax_with_tensorflow_absent():
    code = textwrap.dedent("""
        import sys
        sys.modules["tensorflow"] = None  # importing TensorFlow now fails, as on the GPU machines
        sys.path.insert(0, "bench")
        import keras, numpy as np
        from gpu_throughput import backbone, fcn
        from pipeline.models import classification_head
        assert keras.backend.backend() == "jax"

        (name, what, rate, _), = fcn("mobilenet_v1", batch=1, size=64, classes=3, steps=1, repeats=1)
        assert rate > 0, rate

        keras.utils.set_random_seed(0)
        head = classification_head((2, 2, 8), num_classes=3, dropout_rate=0.2, pooling="avg")
        head.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
        features = np.random.default_rng(0).normal(size=(6, 2, 2, 8)).astype("float32")
        labels = np.arange(6) % 3
        before = head.test_on_batch(features, labels)  # without dropout's noise
        for _ in range(30):
            head.train_on_batch(features, labels)
        after = head.test_on_batch(features, labels)
        assert after < before, (before, after)
        assert backbone("vgg16").feature_layer == "block5_pool"
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "KERAS_BACKEND": "jax"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
