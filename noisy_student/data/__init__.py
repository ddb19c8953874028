"""Data sources, preprocessing and the training input streams."""
