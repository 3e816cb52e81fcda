"""A job: loading a plan, the batch loop over modes, its folder (record, parts, lock), shards and ranks, studies,
joint runs and checkpoint studies."""
