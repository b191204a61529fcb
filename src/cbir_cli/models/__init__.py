"""Models: the registry (one config per model), weights, and the embedders that
implement the :class:`~cbir_cli.models.protocol.Embedder` seam (PyTorch, ONNX
Runtime, hand-crafted descriptors). Get one with
:func:`cbir_cli.models.loading.load_embedder`."""
