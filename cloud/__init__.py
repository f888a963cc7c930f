"""The coordinator: training, quantization, the registry, artifacts, the `fleet` CLI."""
