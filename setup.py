"""Build the package's C parts: the router's core (router/fastlane.c) and the workers'
staging copier (workers/copier.c).

They use no Python headers (ctypes loads them), so each extension is a plain shared
object; setuptools only provides the compiler invocation. Metadata lives in
pyproject.toml.

Before compiling, build_ext writes router/fastlane_protocol.h from router/protocol.py
(router/genheader.py): the C core's constants have one source, and every build path
(``pip install -e .``, ``pip install .``, ``setup.py build_ext --inplace``) runs this.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # router.genheader: stdlib only, safe to import at build time

from router.genheader import write_header  # noqa: E402


class BuildWithProtocolHeader(build_ext):
    def run(self) -> None:
        write_header()
        super().run()


setup(
    cmdclass={"build_ext": BuildWithProtocolHeader},
    ext_modules=[
        Extension(
            "router._fastlane",
            sources=["router/fastlane.c"],
            depends=["router/fastlane_protocol.h", "router/fastlane_peers.h", "router/protocol.py"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            libraries=["dl"],  # dlopen/dlsym; part of libc since glibc 2.34
        ),
        Extension(
            "workers._copier",
            sources=["workers/copier.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-pthread"],
            extra_link_args=["-pthread"],
        ),
    ],
)
