"""Config-driven Keras 3 pipeline: transfer learning, classification and FCN-32s on pretrained backbones."""
