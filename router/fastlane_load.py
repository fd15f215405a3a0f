"""Find, check and bind the compiled C core (``router/_fastlane*.so``), once per process.

A library is refused unless it was built for this code: its ABI number
(``protocol.FASTLANE_ABI``) and the digest of the ``router.protocol`` constants its
generated header held must both match. It shares pyzmq's own libzmq (found in this
process's memory map), so the socket handles pyzmq gives us are the ones C uses.
"""

from __future__ import annotations

import ctypes
import glob
import os

import zmq

from router import protocol as p
from router.fastlane_abi import SIGNATURES
from router.genheader import digest

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_HINT = (
    "rebuild it with `pip install -e .`, or by hand: `python -m router.genheader && "
    "gcc -O2 -shared -fPIC -o router/_fastlane.so router/fastlane.c`"
)
# The values the generated header must have held when the library was built.
PROTOCOL_DIGEST = digest({name: getattr(p, name) for name in p.C_EXPORTS})


class FastlaneUnavailable(RuntimeError):
    """The compiled core is missing or cannot bind to pyzmq's libzmq."""


def _library_path() -> str:
    found = sorted(glob.glob(os.path.join(HERE, "_fastlane*.so")))
    if not found:
        raise FastlaneUnavailable(f"router/_fastlane*.so is not built: {BUILD_HINT}")
    return found[0]


def _libzmq_path() -> str:
    """The libzmq file pyzmq loaded: the one whose socket handles we are given."""
    zmq.Context.instance()  # make sure the backend (and its libzmq) is loaded
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rstrip("\n").split(maxsplit=5)[-1]
            if "libzmq" in os.path.basename(path) and os.path.exists(path):
                return path
    # pyzmq built with libzmq linked statically into its extension module
    from zmq.backend.cython import _zmq

    return str(_zmq.__file__)


_lib: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """Load and bind the library once per process; raise FastlaneUnavailable if we can't."""
    global _lib
    if _lib is not None:
        return _lib
    path = _library_path()
    lib = ctypes.CDLL(path)
    abi = lib.fl_abi() if hasattr(lib, "fl_abi") else 0
    if abi != p.FASTLANE_ABI:
        raise FastlaneUnavailable(
            f"{path} is a stale build (ABI {abi}, this code needs {p.FASTLANE_ABI}): {BUILD_HINT}"
        )
    lib.fl_protocol_digest.restype = ctypes.c_int64
    if lib.fl_protocol_digest() != PROTOCOL_DIGEST:
        raise FastlaneUnavailable(
            f"{path} was built from other router/protocol.py constants: {BUILD_HINT}"
        )
    rc = lib.fl_bind(_libzmq_path().encode())
    if rc != 0:
        raise FastlaneUnavailable(f"fastlane could not bind to pyzmq's libzmq (code {rc})")
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    _lib = lib
    return lib


def available() -> bool:
    try:
        load()
    except (FastlaneUnavailable, OSError):
        return False
    return True
