"""Training on CPU (GPU when present) and ONNX export. Imports torch: load lazily."""
