"""The embedded demo data set: right classes and counts, decodable, deterministic, and built atomically."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import tensorflow as tf

from pipeline import demo
from pipeline.demo import CLASS_COUNTS, MARKER_NAME, ensure_demo_folder

EXPECTED_COUNTS = {"brick": 64, "face": 100, "grass": 64, "gravel": 64, "non_face": 100, "tissue": 64}


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, marker included, keyed by relative path."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _mtimes(folder: Path) -> dict[str, int]:
    return {path.relative_to(folder).as_posix(): path.stat().st_mtime_ns for path in folder.rglob("*")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One demo set shared by the read-only tests (building takes about a second)."""
    folder = tmp_path_factory.mktemp("first") / "demo"
    assert ensure_demo_folder(str(folder)) == str(folder)
    return folder


def test_classes_and_counts(built):
    assert CLASS_COUNTS == EXPECTED_COUNTS
    class_folders = sorted(path.name for path in built.iterdir() if path.is_dir())
    assert class_folders == sorted(EXPECTED_COUNTS)
    for class_name, count in EXPECTED_COUNTS.items():
        assert len(list((built / class_name).iterdir())) == count, class_name
    # Nothing but the class folders and the completion marker; no temporary siblings left behind.
    assert {path.name for path in built.iterdir() if path.is_file()} == {MARKER_NAME}
    assert [path.name for path in built.parent.iterdir()] == ["demo"]


def test_formats_are_mixed_on_purpose(built):
    files = [path for path in built.rglob("*") if path.is_file() and path.name != MARKER_NAME]
    suffixes = [path.suffix for path in files]
    assert {".jpg", ".png", ".JPG", ".PNG"} == set(suffixes)
    assert suffixes.count(".jpg") > len(files) / 2
    one_channel = [path for path in files if tf.io.decode_image(path.read_bytes()).shape[-1] == 1]
    assert 0 < len(one_channel) < len(files) / 5


def test_every_file_decodes_as_rgb(built):
    for path in built.rglob("*"):
        if not path.is_file() or path.name == MARKER_NAME:
            continue
        image = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
        height, width, channels = image.shape
        assert channels == 3, path
        assert 64 <= min(height, width) and max(height, width) <= 300, (path, image.shape)


def test_builds_are_byte_identical(built, tmp_path):
    second = tmp_path / "demo"
    ensure_demo_folder(str(second))
    assert _digests(second) == _digests(built)


def test_complete_folder_is_returned_untouched(built, monkeypatch):
    before = _mtimes(built)
    monkeypatch.setattr(demo, "_build", lambda *args: pytest.fail("a complete demo set was rebuilt"))
    assert ensure_demo_folder(str(built)) == str(built)
    assert _mtimes(built) == before


@pytest.mark.parametrize("damage", ["no_marker", "some_files_missing", "file_changed", "empty_folder"])
def test_half_built_folder_is_rebuilt(built, tmp_path, damage):
    folder = tmp_path / "demo"
    shutil.copytree(built, folder)
    if damage == "no_marker":  # interrupted before the marker was written
        (folder / MARKER_NAME).unlink()
        for path in sorted((folder / "grass").iterdir())[10:]:
            path.unlink()
    elif damage == "some_files_missing":
        shutil.rmtree(folder / "tissue")
    elif damage == "file_changed":
        next((folder / "face").iterdir()).write_bytes(b"truncated")
    else:
        shutil.rmtree(folder)
        folder.mkdir()
    ensure_demo_folder(str(folder))
    assert _digests(folder) == _digests(built)
    assert [path.name for path in tmp_path.iterdir()] == ["demo"]


def test_folder_with_foreign_files_is_not_deleted(tmp_path):
    folder = tmp_path / "demo"
    (folder / "cats").mkdir(parents=True)
    (folder / "cats" / "tom.jpg").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="never writes"):
        ensure_demo_folder(str(folder))
    assert (folder / "cats" / "tom.jpg").read_bytes() == b"not ours"


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = []

    def encode_then_fail(*args):
        calls.append(args)
        if len(calls) > 150:
            raise KeyboardInterrupt
        return original(*args)

    original = demo._encode
    monkeypatch.setattr(demo, "_encode", encode_then_fail)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_folder(str(tmp_path / "demo"))
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary sibling remains
