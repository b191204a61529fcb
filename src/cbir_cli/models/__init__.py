"""Models: the model-family seam (:mod:`.family`: families registered by entry
point, the built-in CNN one in :mod:`.cnn_family` with its table in :mod:`.registry`),
weights, and the embedders that implement the :class:`~cbir_cli.models.protocol.Embedder`
seam (PyTorch, ONNX Runtime, hand-crafted descriptors). Get one with
:func:`cbir_cli.models.loading.load_embedder`."""
