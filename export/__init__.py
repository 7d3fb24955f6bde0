"""Export a model directory to ONNX graphs with a cached incremental decoder, verified against torch."""
