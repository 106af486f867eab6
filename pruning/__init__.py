"""Choosing what to remove: planned sweeps, scoring rules, searches, budgets and the comparison of them."""
