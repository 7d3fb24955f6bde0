"""Export a model directory to ONNX graphs with a cached incremental decoder, verified against torch.

``signature`` declares the graphs; ``wrappers`` + ``onnx_export`` build them from the torch network;
``ort_step`` runs them (onnxruntime only, no torch: the service imports it); ``validate`` checks them in
ordered steps; ``evaluate`` translates and scores; ``manifest``, ``pipeline`` and ``cli`` make ``mt-export``.
"""
