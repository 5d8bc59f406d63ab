"""Offline weights into Keras: TF-Slim checkpoints and graphs (slim), PyTorch state dicts (pytorch), HED (hed)."""
