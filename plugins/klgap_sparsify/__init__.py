"""Placeholder: the sparsify SAE loader plugin is being written (registers nothing yet)."""
