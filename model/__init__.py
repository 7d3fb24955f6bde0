"""The network and everything needed to run it; importing this package never imports torch.

Torch-free: ``model.config``, ``model.tokenizer``, ``model.search``, ``model.model_dir``.
Torch: ``model.transformer``, ``model.weights``, ``model.torch_step`` (import them explicitly).
"""
