"""Shared by every test directory: this file puts tests/ on sys.path (pytest's rootdir-less
``prepend`` import mode), so that helpers such as ``proctree`` import as top-level modules."""
