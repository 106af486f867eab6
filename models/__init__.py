"""Ground floor for models: loading a checkpoint, the family registry, removing blocks."""
