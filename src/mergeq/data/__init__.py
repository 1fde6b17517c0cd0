"""Data: the embedded multi-domain "digits" benchmark (see ``mergeq.data.digits``) and image-folder
benchmarks read from a user-given path, e.g. Office-Home (see ``mergeq.data.folder``)."""
from .digits import (BENCHMARKS, TARGET_DOMAINS, Benchmark, Domain, load_benchmark, load_digits_benchmark,
                     save_sample_grid, standardize)
from .folder import (OFFICE_HOME_DOMAINS, FolderDataError, FolderImages, FolderNotFoundError, ImageTransform,
                     load_folder_benchmark, load_office_home, materialize)

__all__ = ["BENCHMARKS", "OFFICE_HOME_DOMAINS", "TARGET_DOMAINS", "Benchmark", "Domain", "FolderDataError",
           "FolderImages", "FolderNotFoundError", "ImageTransform", "load_benchmark", "load_digits_benchmark",
           "load_folder_benchmark", "load_office_home", "materialize", "save_sample_grid", "standardize"]
