"""CUDA-only checks (marker `cuda`, deselected by default): python -m pytest -m cuda tests/gpu"""
