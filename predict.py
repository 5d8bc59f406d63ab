"""Classify images from the Hydra configs in conf/: `python predict.py inputs=[photo.jpg,photos/] [backbone=...]`.

The same app is `pipeline-predict` once the package is installed (`pip install .`); see pipeline/apps.py.
"""

from pipeline.apps import predict as main

if __name__ == "__main__":
    main()
