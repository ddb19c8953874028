"""The models: EfficientNet and its layers, pretrained checkpoints in, loading a trained model."""
