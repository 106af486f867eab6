"""A pruned model the user keeps: the checkpoint, its model card, and healing before it is written."""
