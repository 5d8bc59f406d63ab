"""A run leaves nothing in the system temp folder, even when its process is killed before it can clean up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import CONF

# Runs every task in one process and lists the temp folder from inside it, before any exit handler:
# AutoGraph deletes its generated modules only at a normal exit, so a killed run (SIGKILL, a cluster's
# time limit) left them behind.
SCRIPT = textwrap.dedent("""
    import os, sys
    from hydra.utils import instantiate
    from pipeline.run import train
    from tests.conftest import compose_config
    from pathlib import Path
    root, photos = Path(sys.argv[1]), sys.argv[2]
    train(compose_config([*TINY, f"dataset.root={photos}", "task=transfer"], root / "transfer"))
    # The other tasks' input functions (training them adds nothing the transfer run did not trace).
    for name, overrides in {
        "classification": [*TINY, f"dataset.root={photos}", "task=classification"],
        "fcn32": ["debug=tiny", "task=fcn32", "dataset=voc_demo", "backbone=mobilenet", "backbone.weights=null",
                  "image_size=[64,64]"],
    }.items():
        data = instantiate(compose_config(overrides, root / name).task).datasets(2)
        next(iter(data.train(0, 1))), next(iter(data.validation))
    left = sorted(Path(os.environ["TMPDIR"]).iterdir())
    print(*(path.read_text() for path in left), sep=chr(10))  # the generated code names the function
    print(len(left))
    os._exit(0)  # as a killed process: no exit handler runs
""")


def test_runs_write_no_autograph_modules_to_the_temp_folder(photo_folder, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    script = f"from tests.conftest import TINY\n{SCRIPT}"
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(photo_folder)], cwd=CONF.parent,
                            env={**os.environ, "TMPDIR": str(temp)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "0", result.stdout
    assert not list(temp.iterdir())
