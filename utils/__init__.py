"""The lowest floor: errors, logging and progress, the token cache, reading text, labels and tables, run metadata."""
