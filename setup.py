"""Builds bdh_fast's native extension (bdh_fast._C) from csrc/ against the installed torch.

Install with `pip install --no-build-isolation .` so the build uses the torch you already have
(torch==2.13.0 CPU on our machines); an isolated build would fetch a different, CUDA, torch.
Without torch at build time, or with BDH_FAST_NO_EXT=1, the package installs without the
extension and bdh_fast.ops falls back to its pure-PyTorch reference (one warning).
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("BDH_FAST_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("bdh_fast: torch not importable at build time; skipping the native extension")
    else:
        ext_modules.append(
            CppExtension(
                name="bdh_fast._C",
                sources=sources,
                extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
                extra_link_args=["-fopenmp"],
                py_limited_api=False,
            )
        )
        cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
