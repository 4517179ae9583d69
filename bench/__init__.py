"""The goma-pt benchmark harness (issue 7): run it with `python bench/run.py`."""
