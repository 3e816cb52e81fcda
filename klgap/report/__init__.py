"""A report's numbers, from a run folder alone: the schema (schema.py, compare_schema.py) and its sections
(sections.py: registered by plugins, klgap's own in builtin_sections.py), reading (read.py), building and
aggregating (build.py, parts.py, aggregate.py, study.py), statistics (stats.py, holm.py), comparisons, checks and
validation."""
