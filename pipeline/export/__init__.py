"""Deployable copies of a run's `model.keras`: SavedModel, LiteRT and ONNX, each checked by its own runtime.

`pipeline.export.run.export_run` writes them (it needs TensorFlow); `pipeline.export.runtimes`
runs the LiteRT and ONNX files without TensorFlow (`predict.py model=<run>/export/model.onnx`).
"""

from pipeline.files import as_list  # light: the checks before TensorFlow import this package

FORMATS = ("saved_model", "litert", "onnx")  # the names `export.py formats=[...]` takes
FILE_NAMES = {"saved_model": "saved_model", "litert": "model.tflite", "onnx": "model.onnx"}


def check_formats(formats) -> list[str]:
    """`formats` as a list (`formats=onnx` on the command line is one format), or a ValueError naming the choices.

    Light on purpose (no TensorFlow): `export.py` and `train.py export.formats=[...]` call it before anything runs.
    """
    formats = as_list(formats)
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        hint = " TFLite files are written by litert (model.tflite)." if {"tflite", "lite"} & set(unknown) else ""
        raise ValueError(f"Unknown export format(s) {unknown or formats}: choose from {list(FORMATS)}, "
                         f"e.g. formats=[saved_model,litert,onnx].{hint}")
    return formats
