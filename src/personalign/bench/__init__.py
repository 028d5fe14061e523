"""Benchmarks behind `personalign bench ...`: each reports ratios against a baseline run side by side."""
