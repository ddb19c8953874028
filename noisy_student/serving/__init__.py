"""The SavedModel a trained model is exported to."""
