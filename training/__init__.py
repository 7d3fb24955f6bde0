"""Training: configs, data reading and batching, SentencePiece, the training loop."""
