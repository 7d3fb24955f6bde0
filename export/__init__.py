"""Export a model directory to ONNX graphs with a cached incremental decoder, verified against torch.

This package imports torch; what runs the graphs lives in ``model`` (``model.signature`` declares them,
``model.runtime`` runs them, ``model.manifest`` reads the manifest), so the service never imports it.
``wrappers`` + ``onnx_export`` build the graphs from the torch network; ``validate`` checks them in ordered
steps; ``manifest`` writes the record; ``pipeline`` and ``cli`` make ``mt-export``.
"""
