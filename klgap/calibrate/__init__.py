"""klgap calibrate: a planted-truth testbed for the baselines (klgap/calibrate/testbed.py)."""
