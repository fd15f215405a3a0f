"""Build the router's C core (router/fastlane.c) with the package.

It uses no Python headers (ctypes loads it), so the extension is a plain shared object;
setuptools only provides the compiler invocation. Metadata lives in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "router._fastlane",
            sources=["router/fastlane.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            libraries=["dl"],  # dlopen/dlsym; part of libc since glibc 2.34
        )
    ]
)
