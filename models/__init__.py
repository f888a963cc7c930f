"""Model definitions shared by cloud training and on-device federated training.

- `models.data`: datasets (the bundled digits, a user's `.npz` or CSV), splits.
- `models.arch`: PyTorch architectures by name (`mlp`, `cnn`, or your own via
  `register_architecture`) with normalization baked in, so every export takes raw
  features. Imports torch: the agent imports it only for federated training of
  non-`mlp` checkpoints (`models.fl.numpy_task` trains the MLP in numpy).
- `models.checkpoint`: the trainable checkpoint (`weights.npz`), numpy only.
- `models.runtime`: run a variant's bytes in its real runtime (ONNX Runtime, LiteRT).
"""
