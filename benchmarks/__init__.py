"""Benchmarks of mitkernels: ``python -m benchmarks.bench_mit_loss --quick`` (``make bench``)."""
