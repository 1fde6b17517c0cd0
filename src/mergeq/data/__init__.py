"""Data: the embedded multi-domain "digits" benchmark (see ``mergeq.data.digits``)."""
from .digits import (BENCHMARKS, TARGET_DOMAINS, Benchmark, Domain, load_benchmark, load_digits_benchmark,
                     save_sample_grid, standardize)

__all__ = ["BENCHMARKS", "TARGET_DOMAINS", "Benchmark", "Domain", "load_benchmark", "load_digits_benchmark",
           "save_sample_grid", "standardize"]
