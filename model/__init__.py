"""The network and everything needed to run it; importing this package never imports torch.

Torch-free: ``model.config``, ``model.tokenizer``, ``model.decoding`` (the decoding options),
``model.search``, ``model.decode``, ``model.model_dir``, and the runtime the service uses:
``model.signature`` (the ONNX graphs' declared inputs/outputs), ``model.runtime`` (onnxruntime sessions and
step functions) and ``model.manifest`` (reading the export manifest, the start-up check of a model dir).
Torch: ``model.transformer``, ``model.weights``, ``model.torch_step`` (import them explicitly).
"""
