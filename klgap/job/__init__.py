"""A command's measurements as one job: planned once (plan.py), loaded (loading.py, cells.py), measured by one batch
loop on any executor (batches.py, modes.py, patch.py), its folders (record, parts, lock), shards and ranks, its
reports built from the folders (finish.py), and the orchestration around it (command.py)."""
