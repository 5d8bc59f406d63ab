"""Train a model from the Hydra configs in conf/: `python train.py [group=option ...] [key=value ...]`.

The same app is `pipeline-train` once the package is installed (`pip install .`); see pipeline/apps.py.
"""

from pipeline.apps import train as main

if __name__ == "__main__":
    main()
