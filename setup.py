"""Build the package's C parts: the router's core (router/fastlane.c) and the workers'
staging copier (workers/copier.c).

They use no Python headers (ctypes loads them), so each extension is a plain shared
object; setuptools only provides the compiler invocation. Metadata lives in
pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "router._fastlane",
            sources=["router/fastlane.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            libraries=["dl"],  # dlopen/dlsym; part of libc since glibc 2.34
        ),
        Extension(
            "workers._copier",
            sources=["workers/copier.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-pthread"],
            extra_link_args=["-pthread"],
        ),
    ]
)
