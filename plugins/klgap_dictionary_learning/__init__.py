"""Placeholder: the dictionary_learning SAE loader plugin is being written (registers nothing yet)."""
