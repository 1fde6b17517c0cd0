"""Data: the embedded multi-domain "digits" benchmark (see ``mergeq.data.digits``), image-folder
benchmarks read from a user-given path, e.g. Office-Home (see ``mergeq.data.folder``), and
``load_data`` / ``load_stream``, which build either from a config's ``data:`` spec (``mergeq.data.spec``)."""
from .digits import (BENCHMARKS, TARGET_DOMAINS, Benchmark, Domain, load_benchmark, load_digits_benchmark,
                     save_sample_grid, standardize)
from .folder import (OFFICE_HOME_DOMAINS, FolderDataError, FolderImages, FolderNotFoundError, ImageTransform,
                     load_folder_benchmark, load_office_home, materialize)
from .spec import load_data, load_stream

__all__ = ["BENCHMARKS", "OFFICE_HOME_DOMAINS", "TARGET_DOMAINS", "Benchmark", "Domain", "FolderDataError",
           "FolderImages", "FolderNotFoundError", "ImageTransform", "load_benchmark", "load_data",
           "load_digits_benchmark", "load_folder_benchmark", "load_office_home", "load_stream", "materialize",
           "save_sample_grid", "standardize"]
