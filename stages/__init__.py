"""Worker runtime (the pull loop) and stage implementations."""
