"""Worker scripts of tests/test_torch_distributed.py (started as separate processes)."""
