"""Builds the Cython layer kernels (kernels/*.pyx) into the dbmpi package.

Compiler directives live here, in one place: bounds checks and wraparound are off for
release builds; DBMPI_DEBUG_KERNELS=1 turns them (and C asserts) back on for debugging.
"""

import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("DBMPI_DEBUG_KERNELS", "0") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "embedsignature": True,
}
compile_args = ["-O0", "-g"] if DEBUG else ["-O3", "-march=native", "-fno-math-errno"]
if os.environ.get("DBMPI_PORTABLE", "0") not in ("", "0"):
    compile_args = [a for a in compile_args if a != "-march=native"]

extensions = [
    Extension("dbmpi._kernels", ["kernels/_kernels.pyx"], depends=["kernels/microgemm.h", "kernels/vmath.h"],
              include_dirs=[np.get_include(), "kernels"], extra_compile_args=compile_args,
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
              + ([] if DEBUG else [("NDEBUG", None)])),
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives,
                            build_dir="build/cython"))
