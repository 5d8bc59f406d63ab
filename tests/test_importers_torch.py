"""PyTorch state dicts read without torch: the reader, and torchvision MobileNetV2 / EfficientNet-Lite0 in Keras.

The references in tests/fixtures/torch_references.npz come from the original PyTorch models run by
tests/fixtures/make_torch_references.py (torch 2.13.0, torchvision 0.28.0's own mobilenet_v2,
efficientnet-lite-pytorch 0.1.0's EfficientNet) on four real photos whose 224x224 crops are stored
beside them; see that script for every step and version.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.efficientnet_lite import EfficientNetLite0
from pipeline.importers import pytorch
from pipeline.importers.packaged import packaged_file
from pipeline.layers import ImagePreprocessing
from pipeline.mobilenet_v2 import MobileNetV2

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REFERENCES = np.load(FIXTURES / "torch_references.npz")
CAT_CLASSES = range(281, 286)
ESPRESSO = 967


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("torch_weights")


def crops() -> np.ndarray:
    return REFERENCES["crops"].astype(np.float32)


@pytest.mark.parametrize("format", ["zip", "legacy"])
def test_reader_matches_torch_for_every_layout(format):
    """dtypes (bfloat16 widened to float32), a transposed tensor, views into one storage, nested dicts."""
    state = pytorch.read_state_dict(FIXTURES / f"torch_state_dict.{format}.pt")
    expected = {name.removeprefix("layout/"): REFERENCES[name] for name in REFERENCES.files
                if name.startswith("layout/")}
    assert set(state) == set(expected)
    for name, value in expected.items():
        assert state[name].dtype == value.dtype, name
        np.testing.assert_array_equal(state[name], value, err_msg=name)


def test_reader_refuses_anything_but_tensors_and_runs_nothing(tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refers to posix.system|refers to os.system"):
        pytorch.read_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_or_foreign_files_are_clear_errors(tmp_path):
    source = packaged_file(pytorch.MOBILENET_V2_PACKAGE, pytorch.MOBILENET_V2_FILE, pytorch.MOBILENET_V2_SHA256)
    data = source.read_bytes()
    for name, content in {"half.pth": data[: len(data) // 2], "head.pth": data[:300],
                          "text.pth": b"not a pickle at all"}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="truncated, corrupt or not a torch.save"):
            pytorch.read_state_dict(tmp_path / name)
    zipped = (FIXTURES / "torch_state_dict.zip.pt").read_bytes()
    (tmp_path / "zip.pt").write_bytes(zipped[: len(zipped) - 200])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        pytorch.read_state_dict(tmp_path / "zip.pt")


def test_wrong_sha256_is_refused_before_reading():
    with pytest.raises(ValueError, match="sha256 mismatch"):
        packaged_file(pytorch.EFFICIENTNET_LITE0_PACKAGE, pytorch.EFFICIENTNET_LITE0_FILE, "0" * 64)


def test_keras_padding_option_is_keras_applications_mobilenet_v2():
    """Same layer names and weights; with padding="keras" the same outputs, also at odd sizes."""
    for shape in [(64, 96, 3), (65, 97, 3)]:
        reference = keras.applications.MobileNetV2(weights=None, input_shape=shape)
        ours = MobileNetV2(padding="keras", input_shape=shape)
        assert [w.path for w in ours.weights] == [w.path for w in reference.weights]
        ours.set_weights(reference.get_weights())
        images = np.random.default_rng(0).uniform(-1, 1, (2, *shape)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(ours(images)), np.asarray(reference(images)), atol=1e-6)


def test_torchvision_mobilenet_v2_equals_torchvision_on_real_photos(cache_dir):
    path = pytorch.mobilenet_v2_weights(cache_dir, include_top=True)
    model = MobileNetV2(weights=path, input_shape=(224, 224, 3))
    probabilities = np.asarray(model(ImagePreprocessing("torch")(crops())))
    reference = REFERENCES["mobilenet_v2_probabilities"]
    np.testing.assert_allclose(probabilities, reference, rtol=0, atol=1e-5)  # measured 1.5e-6
    np.testing.assert_array_equal(probabilities.argmax(-1), reference.argmax(-1))
    cat, coffee = probabilities.argmax(-1)[:2]
    assert cat in CAT_CLASSES and coffee == ESPRESSO

    # Why the padding option exists: keras.applications' (0, 1) padding with the same weights is off.
    stock = keras.applications.MobileNetV2(weights=None)
    stock.load_weights(path)
    assert np.abs(np.asarray(stock(ImagePreprocessing("torch")(crops()))) - reference).max() > 0.05

    base = MobileNetV2(include_top=False, weights=pytorch.mobilenet_v2_weights(cache_dir))
    features = keras.Model(model.input, model.get_layer("out_relu").output)(ImagePreprocessing("torch")(crops()))
    np.testing.assert_allclose(np.asarray(base(ImagePreprocessing("torch")(crops()))), np.asarray(features),
                               atol=1e-6)


def test_efficientnet_lite0_equals_the_pytorch_model_on_real_photos(cache_dir):
    model = EfficientNetLite0(weights=pytorch.efficientnet_lite0_weights(cache_dir, include_top=True),
                              input_shape=(224, 224, 3))
    probabilities = np.asarray(model(ImagePreprocessing("lite")(crops())))
    reference = REFERENCES["efficientnet_lite0_probabilities"]
    np.testing.assert_allclose(probabilities, reference, rtol=0, atol=1e-5)  # measured 6e-7
    np.testing.assert_array_equal(probabilities.argmax(-1), reference.argmax(-1))
    cat, coffee = probabilities.argmax(-1)[:2]
    assert cat in CAT_CLASSES and coffee == ESPRESSO
    assert sum(w.numpy().size for w in model.weights if "moving" not in w.path) == 4_652_008  # 4.65 M


def test_conversion_is_cached_by_source_hash(cache_dir, monkeypatch):
    pytorch.mobilenet_v2_weights(cache_dir)  # converted by an earlier test or now
    names = sorted(p.name for p in cache_dir.iterdir())
    assert f"mobilenet_v2_torchvision-{pytorch.MOBILENET_V2_SHA256[:16]}_notop.weights.h5" in names
    assert not [name for name in names if name.startswith(".tmp")]

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached call must not read the source again")

    monkeypatch.setattr(pytorch, "read_state_dict", no_conversion)
    assert pytorch.mobilenet_v2_weights(cache_dir).endswith("_notop.weights.h5")


def test_mapping_lists_missing_and_misshapen_tensors_and_assigns_nothing():
    source = packaged_file(pytorch.MOBILENET_V2_PACKAGE, pytorch.MOBILENET_V2_FILE, pytorch.MOBILENET_V2_SHA256)
    state = pytorch.read_state_dict(source)
    del state["features.5.conv.1.0.weight"]
    state["features.9.conv.3.weight"] = np.ones(3, np.float32)
    state["extra.weight"] = np.ones(2, np.float32)
    model = MobileNetV2()
    before = [weight.copy() for weight in model.get_weights()]
    with pytest.raises(ValueError) as error:
        pytorch.assign_torch_state_dict(model, state, pytorch.torchvision_mobilenet_v2_sources(), 1e-5, "x")
    message = str(error.value)
    assert "block_4_depthwise/kernel: the state dict has no tensor 'features.5.conv.1.0.weight'" in message
    assert "block_8_project_BN/gamma: Keras expects shape (64,)" in message
    assert "extra.weight: torch tensor (2,) with no Keras weight" in message
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_your_own_state_dict_through_the_backbone_config(tmp_path, cache_dir):
    """`backbone=mobilenet_v2_torchvision backbone.weights=model.pth` (here: torchvision's file itself)."""
    from hydra.utils import instantiate

    from pipeline.backbones import weights_fingerprint
    from tests.conftest import compose_config

    source = packaged_file(pytorch.MOBILENET_V2_PACKAGE, pytorch.MOBILENET_V2_FILE, pytorch.MOBILENET_V2_SHA256)
    copy = tmp_path / "mine.pth"
    copy.write_bytes(source.read_bytes())
    mine = instantiate(compose_config(["backbone=mobilenet_v2_torchvision", f"backbone.weights={copy}"],
                                      tmp_path).backbone)
    packaged = instantiate(compose_config(["backbone=mobilenet_v2_torchvision",  # converted above already
                                           f"backbone.imagenet_weights.cache_dir={cache_dir}"], tmp_path).backbone)
    assert weights_fingerprint(mine.build()) == weights_fingerprint(packaged.build())
