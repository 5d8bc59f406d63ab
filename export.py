"""Export a training run for deployment: `python export.py run_dir=outputs/<date>/<time> [formats=[onnx]]`.

The same app is `pipeline-export` once the package is installed (`pip install .`); see pipeline/apps.py.
"""

from pipeline.apps import export as main

if __name__ == "__main__":
    main()
