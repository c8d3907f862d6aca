"""Benchmark scripts for ksfx (outside the package): pattern sweep, end-to-end models, report."""
