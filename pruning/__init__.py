"""Finding, removing and choosing transformer blocks."""
