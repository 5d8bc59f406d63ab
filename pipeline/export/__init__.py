"""Deployable copies of a run's `model.keras`: SavedModel, LiteRT and ONNX, each checked by its own runtime.

`pipeline.export.run.export_run` writes them (it needs TensorFlow); `pipeline.export.runtimes`
runs the LiteRT and ONNX files without TensorFlow (`predict.py model=<run>/export/model.onnx`).
"""

FORMATS = ("saved_model", "litert", "onnx")  # the names `export.py formats=[...]` takes
FILE_NAMES = {"saved_model": "saved_model", "litert": "model.tflite", "onnx": "model.onnx"}
