"""Generator and scorer implementations and their loaders."""
