"""A report's numbers, from a run folder alone: the schema (schema.py, compare_schema.py), building and
aggregating (build.py, aggregate.py), statistics (stats.py, holm.py), sections, comparisons, checks and validation."""
