"""Annotate images with an ImageNet classifier run fully convolutionally: `python annotate.py inputs=[photo.jpg]`.

The same app is `pipeline-annotate` once the package is installed (`pip install .`); see pipeline/apps.py.
"""

from pipeline.apps import annotate as main

if __name__ == "__main__":
    main()
