"""What a user asks for, checked before anything loads: the run configuration (config.py), specs and sites
(specs.py, sites.py, grid.py), resolution into a typed plan (resolve.py) and `--dry-run` (dryrun.py)."""
