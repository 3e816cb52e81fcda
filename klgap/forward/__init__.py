"""One batch through the model: reading and patching a site (activations.py, hooks.py), the executors that run
clean and patched forwards (executors.py, suffix.py, kvcache.py), and per-token KL / ΔCE (metrics.py, finite.py)."""
