"""The HTTP translation service: FastAPI routes, micro-batcher, ONNX Runtime engine, batch client."""
