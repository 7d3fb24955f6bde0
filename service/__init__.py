"""The HTTP translation service: FastAPI routes, continuous batcher, ONNX Runtime engine, batch client."""
