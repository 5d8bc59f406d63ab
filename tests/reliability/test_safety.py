"""Safety: hostile file names cannot make a run write outside its run and cache folders."""

from __future__ import annotations

import os
import shutil

from pipeline.run import train
from tests.conftest import TINY, compose_config

HOSTILE = ["..jpg", "-rf.jpg", "$(touch pwned).jpg", "line\nbreak.jpg", "back\\slash.png", "../x.jpg"]


def snapshot(root):
    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files}


def test_hostile_file_names_are_read_only_and_reports_stay_in_the_run_folder(photo_folder, tmp_path):
    source = photo_folder / "cat" / "cat_002.jpg"
    for name in HOSTILE:
        if "/" not in name:
            shutil.copy(source, photo_folder / "cat" / name)
    (photo_folder / "coffee" / "..").resolve()  # a name cannot climb: "/" is not allowed in names
    before = snapshot(tmp_path)
    metrics = train(compose_config([*TINY, f"dataset.root={photo_folder}"], tmp_path))

    written = snapshot(tmp_path) - before
    allowed = (str(tmp_path / "run") + os.sep, str(tmp_path / ".cache") + os.sep)
    assert written and all(path.startswith(allowed) for path in written), sorted(
        p for p in written if not p.startswith(allowed))
    assert not (tmp_path / "pwned").exists() and not (photo_folder / "pwned").exists()
    assert metrics["skipped_images"] == 0
