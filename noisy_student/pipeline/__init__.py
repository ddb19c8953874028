"""The Noisy Student pipeline: its stages, the experiment that chains them, the work directory's layout, lock and manifest."""
