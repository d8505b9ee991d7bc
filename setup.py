"""Builds softmax_ext._C (the CPU kernels in csrc/) against the installed torch.

Install with ``pip install --no-build-isolation -e .`` so the extension links the torch you run.
"""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location(
    "_build_flags", ROOT / "softmax_ext" / "_build_flags.py"
)
_flags = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_flags)

setup(
    packages=find_packages(include=["softmax_ext", "softmax_ext.*"]),
    ext_modules=[
        CppExtension(
            "softmax_ext._C",
            sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")),
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": _flags.cxx_flags()},
            extra_link_args=_flags.link_flags(),
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
