"""The plugin manager (manager.py), the capabilities a plugin object may declare (capabilities.py), objects a
Python caller holds as the kinds plugins register (held.py) and the hub check plugins make before a download
(hubcheck.py)."""
