"""Benchmarks: loopback and lab-network reproductions of the paper's Table 4 (see bench/*.py)."""
