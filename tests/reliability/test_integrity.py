"""Cache and input integrity, faults injected for real: damaged and swapped cache entries, an image
replaced while caching, FIFOs and /dev/zero in a class folder, a pixel bomb, .pth memory bombs, an
unreadable metrics.json, and a run folder locked by a live process."""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import types
import zipfile
import zlib
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.cache import FeatureCache, encode_entry, entry_problem, feature_dataset
from pipeline.data import ImageFolder
from pipeline.files import sha256_file
from pipeline.importers.pytorch import read_state_dict
from pipeline.runs import RunFolderBusy, folder_owner, lock_folder
from pipeline.sweeps import read_job
from tests.conftest import write_photo_folder


def tiny_cache(directory: Path) -> tuple[FeatureCache, keras.layers.Layer]:
    keras.utils.set_random_seed(0)
    extractor = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, strides=4)])
    return FeatureCache(directory, extractor, {"test": "tiny"}), keras.layers.Resizing(32, 32)


def fill(cache, resizing, paths):
    return cache.fill(paths, [1] * len(paths), batch_size=4, resizing=resizing)


def test_damaged_or_swapped_cache_entries_are_recomputed_once_with_a_warning(tmp_path, caplog):
    paths = [str(p) for p in sorted((write_photo_folder(tmp_path / "photos", images_per_class=2)).rglob("*.*"))]
    cache, resizing = tiny_cache(tmp_path / "cache")
    first = fill(cache, resizing, paths)
    original = {entry: entry.read_bytes() for entry in first.entries}
    entries = first.entries
    assert all(entry_problem(e, e.stem, (8, 8, 4)) is None for e in entries)

    entries[0].write_bytes(original[entries[0]][: len(original[entries[0]]) // 2])  # truncated
    entries[1].write_bytes(b"")  # zero bytes
    flipped = bytearray(original[entries[2]])
    flipped[-10] ^= 0xFF  # one flipped byte in the features
    entries[2].write_bytes(bytes(flipped))
    entries[3].write_bytes(original[entries[4]])  # another image's entry under this name
    entries[5].write_bytes(encode_entry(entries[5].stem, np.zeros((2, 2, 4), np.float32)))  # another shape

    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        second = fill(cache, resizing, paths)
    warnings = [record.getMessage() for record in caplog.records if "is damaged" in record.getMessage()]
    assert len(warnings) == 5
    for entry, reason in zip([entries[i] for i in (0, 1, 2, 3, 5)],
                             ["bytes, expected", "not a feature entry", "checksum mismatch",
                              "another image", "shape [2, 2, 4]"]):
        assert any(str(entry) in line and reason in line for line in warnings), (entry, reason, warnings)
    assert second.hits == 1 and second.entries == entries
    for entry in entries:
        assert entry.read_bytes() == original[entry], "recomputed to the same features"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        assert fill(cache, resizing, paths).hits == 6
    assert not caplog.records, "recomputed once: the next run uses them silently"

    read = [features for features, _ in feature_dataset(entries, np.zeros(6, np.int32), (8, 8, 4))]
    for entry, features in zip(entries, read):
        payload = np.frombuffer(original[entry][256:], "<f4").reshape(8, 8, 4)
        np.testing.assert_array_equal(features.numpy(), payload)


class ReplacedWhileCaching(FeatureCache):
    """The fault of the issue: between hashing and decoding, one image's file is replaced (cp)."""

    replace: tuple[str, str]

    def _compute(self, paths, *args, **kwargs):
        shutil.copyfile(*self.replace)
        return super()._compute(paths, *args, **kwargs)


def test_an_image_replaced_during_caching_is_stored_under_the_hash_of_the_bytes_decoded(tmp_path):
    paths = [str(p) for p in sorted((write_photo_folder(tmp_path / "photos", images_per_class=2)).rglob("*.*"))]
    source, victim = paths[0], paths[-1]
    old_hash, new_hash = sha256_file(victim), sha256_file(source)
    _, resizing = tiny_cache(tmp_path / "cache")
    keras.utils.set_random_seed(0)
    extractor = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, strides=4)])
    cache = ReplacedWhileCaching(tmp_path / "cache", extractor, {"test": "tiny"})
    cache.replace = (source, victim)
    result = fill(cache, resizing, paths)

    assert not cache.entry(old_hash).exists(), "no entry named after bytes that were never decoded"
    assert result.entries[-1] == cache.entry(new_hash), "the victim's features are those of its new bytes"
    assert entry_problem(result.entries[-1], new_hash, (8, 8, 4)) is None


def crafted_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with almost no data: a pixel bomb in 100 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.timeout(60)  # a FIFO used to block the scan forever: fail instead of hanging
def test_fifo_dev_zero_and_pixel_bomb_are_skipped_and_listed_without_hanging(tmp_path):
    root = write_photo_folder(tmp_path / "photos", images_per_class=4)
    os.mkfifo(root / "cat" / "pipe.jpg")
    (root / "coffee" / "zero.png").symlink_to("/dev/zero")
    (root / "rocket" / "huge.png").write_bytes(crafted_png(20000, 20000))

    dataset = ImageFolder(str(root), validation_percent=25, test_percent=25)
    skipped = {Path(path).name: reason for path, reason in dataset.skipped}
    assert skipped == {"pipe.jpg": "not a regular file (a FIFO)", "zero.png": "not a regular file (a device)",
                       "huge.png": "20000x20000 is 400000000 pixels, over the limit of 178956970 "
                                   "(dataset.max_image_pixels)"}
    listed = [path for split in dataset.splits.values() for path in split.relative_paths]
    assert len(listed) == 12 and not any(name in path for path in listed for name in skipped)

    cache, resizing = tiny_cache(tmp_path / "cache")
    absolute = [str(root / "cat" / "pipe.jpg"), str(root / "coffee" / "zero.png"), *dataset.absolute(listed)]
    result = fill(cache, resizing, absolute)  # a cache handed such files reads none of them
    assert [reason for _, reason in result.bad] == ["not a regular file (a FIFO)", "not a regular file (a device)"]
    assert dataset.orientations(listed) == [1] * 12


def test_pixel_limit_is_configurable(tmp_path):
    root = write_photo_folder(tmp_path / "photos", images_per_class=2, size=48)
    dataset = ImageFolder(str(root), validation_percent=0, test_percent=0, max_image_pixels=48 * 48 - 1)
    assert len(dataset.skipped) == 6
    with pytest.raises(ValueError, match="over the limit of 2303"):
        ImageFolder(str(root), max_image_pixels=48 * 48 - 1, on_bad_image="error")


def torch_like_file(path: Path, shape, stride, numel: int, storage: bytes, compress: bool) -> Path:
    """A zip-format .pth written as torch.save writes it (data.pkl + data/<key>), without torch."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*arguments):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
    torch.FloatStorage, torch._utils, utils._rebuild_tensor_v2 = FloatStorage, utils, _rebuild_tensor_v2

    class StorageReference:
        pass

    class Tensor:
        def __reduce__(self):
            return _rebuild_tensor_v2, (StorageReference(), 0, shape, stride, False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", FloatStorage, "0", "cpu", numel) if isinstance(obj, StorageReference) else None

    buffer = io.BytesIO()
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        Pickler(buffer, protocol=2).dump(collections.OrderedDict(weight=Tensor()))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/data/0", storage,
                         compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
    return path


def test_pth_memory_bombs_are_refused_before_allocating(tmp_path):
    expanded = torch_like_file(tmp_path / "stride0.pth", (20000, 20000), (0, 0), 1, b"\0" * 4, compress=False)
    assert expanded.stat().st_size < 1000
    with pytest.raises(ValueError, match="tensor 'weight' of shape \\(20000, 20000\\) has 400000000 elements "
                                         "but its storage only 1"):
        read_state_dict(expanded)
    deflated = torch_like_file(tmp_path / "deflated.pth", (25_000_000,), (1,), 25_000_000, b"\0" * 100_000_000,
                               compress=True)
    assert deflated.stat().st_size < 1_000_000
    with pytest.raises(ValueError, match="declare 100000000 bytes but the file has"):
        read_state_dict(deflated)
    honest = torch_like_file(tmp_path / "honest.pth", (2, 3), (3, 1), 6, np.arange(6, dtype="<f4").tobytes(),
                             compress=False)
    np.testing.assert_array_equal(read_state_dict(honest)["weight"], np.arange(6).reshape(2, 3))


def test_an_unreadable_metrics_json_makes_its_job_unfinished_and_names_the_file(tmp_path, caplog):
    job = tmp_path / "sweep" / "3"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- epochs=2\n")
    (job / "metrics.json").write_text('{"test/accuracy": 0.9')  # cut off
    with caplog.at_level(logging.WARNING, logger="pipeline.sweeps"):
        assert read_job(job).status == "incomplete"
    [message] = [record.getMessage() for record in caplog.records]
    assert str(job / "metrics.json") in message and "\n" not in message and "runs it again" in message


def test_a_run_folder_is_locked_while_its_process_lives_and_freed_when_it_is_killed(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.runs import lock_folder;"
                               f"lock_folder({str(folder)!r}); print('locked', flush=True); time.sleep(600)"],
                              cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert folder_owner(folder) == holder.pid
        with pytest.raises(RunFolderBusy, match=f"in use by another run \\(process {holder.pid}\\)"):
            lock_folder(folder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert folder_owner(folder) is None, "the kernel frees the lock of a killed process"
    lock_folder(folder)
    assert folder_owner(tmp_path / "never") is None
