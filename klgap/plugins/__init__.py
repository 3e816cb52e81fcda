"""The plugin manager (manager.py), the capabilities a plugin object may declare (capabilities.py) and the
hub check plugins make before a download (hubcheck.py)."""
