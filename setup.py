"""
Builds nanoslm's native extension, _nanoslm, from csrc/ (C++17, -O3, threads, the GIL released).

    pip install -e . --no-build-isolation     # or: python setup.py build_ext --inplace
"""
import sys
from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ParallelCompile("NPY_NUM_BUILD_JOBS").install()  # compile the .cpp files in parallel

compile_args = ["/O2", "/std:c++17"] if sys.platform == "win32" else ["-O3", "-std=c++17", "-pthread"]
link_args = [] if sys.platform == "win32" else ["-pthread"]

setup(
    name="nanoslm",
    version="0.1.0",
    description="Build a small language model from scratch on one machine",
    # Only the extension goes into site-packages. The library modules (tokenizer.py, data.py, model.py, ...)
    # are imported from the repository root, where the scripts run: installed, generic names like `data` or
    # `model` would shadow a user's own modules (and a package of the same name) in every other project.
    # tests/ and bench/ put the root on sys.path themselves.
    py_modules=[],
    packages=[],
    ext_modules=[
        Pybind11Extension(
            "_nanoslm",
            sorted(["csrc/bindings.cpp", "csrc/pretokenize.cpp", "csrc/encoder.cpp", "csrc/trainer.cpp",
                    "csrc/batch.cpp", "csrc/decode.cpp"]),
            depends=["csrc/bpe.h", "csrc/decode.h", "csrc/decode_int8.h", "csrc/unicode_table.h"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            cxx_std=17,
        )
    ],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.9",
)
