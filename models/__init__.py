"""Models: loading a checkpoint, the family registry, units and removal sets, removing blocks and sublayers."""
