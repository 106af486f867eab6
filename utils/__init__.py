"""Loading models and data, results files, logging, errors."""
