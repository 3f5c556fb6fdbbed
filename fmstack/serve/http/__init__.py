"""The HTTP layer of `fmstack serve` (see fmstack/serve/api.py for the map of its modules)."""
