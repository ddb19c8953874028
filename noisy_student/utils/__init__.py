"""Helpers every part uses: atomic file storage on local and gs:// paths, the report writer, contact sheets."""
