"""The ctypes declarations of ``router/fastlane.c``'s interface: its two records and the
result and argument types of every function ``router.fastlane_load.load`` binds.

This is the Python half of the C ABI; ``protocol.FASTLANE_ABI`` is bumped whenever a
signature here (and its C twin) changes.
"""

from __future__ import annotations

import ctypes
from typing import Any

from router import protocol as p

_u8p = ctypes.POINTER(ctypes.c_ubyte)
_u64 = ctypes.c_uint64
_vp = ctypes.c_void_p


class PollItem(ctypes.Structure):
    _fields_ = [
        ("socket", _vp),
        ("fd", ctypes.c_int),
        ("events", ctypes.c_short),
        ("revents", ctypes.c_short),
    ]


_CTYPES: dict[str, type[ctypes.c_int] | type[ctypes.c_double]] = {
    "int": ctypes.c_int,
    "double": ctypes.c_double,
}


class ReqInfo(ctypes.Structure):
    """C's req_info_t: both are made from ``protocol.REQ_INFO_FIELDS``."""

    _fields_ = [(name, _CTYPES[ctype]) for name, ctype in p.REQ_INFO_FIELDS]


# name: (result type, argument types)
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "fl_new": (_vp, [_vp, _vp]),
    "fl_free": (None, [_vp]),
    "fl_add_code": (ctypes.c_int, [_vp, ctypes.c_char_p, ctypes.c_size_t]),
    "fl_set_bounds": (ctypes.c_int, [_vp, ctypes.POINTER(ctypes.c_double), ctypes.c_int]),
    "fl_model_add": (ctypes.c_int, [_vp, ctypes.c_char_p, ctypes.c_size_t]),
    "fl_model_remove": (None, [_vp, ctypes.c_int]),
    "fl_model_set": (
        None,
        [_vp, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_int],
    ),
    "fl_kick": (None, [_vp, ctypes.c_int]),
    "fl_set_reply_limits": (
        ctypes.c_int,
        [_vp, ctypes.c_int64, ctypes.c_int64, ctypes.c_char_p, ctypes.c_size_t],
    ),
    "fl_model_set_full_error": (
        ctypes.c_int,
        [_vp, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t],
    ),
    "fl_model_rejections": (None, [_vp, ctypes.c_int, ctypes.POINTER(_u64)]),
    "fl_peer_stats": (None, [_vp, ctypes.POINTER(ctypes.c_int64)]),
    "fl_trim": (ctypes.c_int, []),
    "fl_peer_closed": (None, [_vp, ctypes.c_int]),
    "fl_queued": (ctypes.c_int, [_vp, ctypes.c_int]),
    "fl_queue_take": (ctypes.c_int, [_vp, ctypes.c_int, ctypes.POINTER(_u64), ctypes.c_int]),
    "fl_worker_drop": (ctypes.c_int, [_vp, ctypes.c_int, ctypes.POINTER(_u64), ctypes.c_int]),
    "fl_model_set_active": (
        ctypes.c_int,
        [_vp, ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    ),
    "fl_worker_add": (
        ctypes.c_int,
        [
            _vp,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ],
    ),
    "fl_worker_remove": (None, [_vp, ctypes.c_int]),
    "fl_lane_listen": (None, [_vp, ctypes.c_int]),
    "fl_worker_lane": (ctypes.c_int, [_vp, ctypes.c_int]),
    "fl_lane_sent": (_u64, [_vp]),
    "fl_lane_received": (_u64, [_vp]),
    "fl_worker_load": (ctypes.c_int, [_vp, ctypes.c_int]),
    "fl_worker_served": (_u64, [_vp, ctypes.c_int]),
    "fl_worker_stats": (
        _u64,
        [
            _vp,
            ctypes.c_int,
            ctypes.POINTER(_u64),
            ctypes.POINTER(_u64),
            ctypes.POINTER(ctypes.c_double),
        ],
    ),
    "fl_check_header": (
        ctypes.c_int,
        [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.POINTER(_u64),
        ],
    ),
    "fl_live": (ctypes.c_int, [_vp]),
    "fl_dropped_replies": (_u64, [_vp]),
    "fl_punt_count": (ctypes.c_int, [_vp]),
    "fl_punt_kind": (ctypes.c_int, [_vp, ctypes.c_int]),
    "fl_punt_worker": (ctypes.c_int, [_vp, ctypes.c_int]),
    "fl_punt_nframes": (ctypes.c_int, [_vp, ctypes.c_int]),
    "fl_punt_frame": (
        ctypes.c_size_t,
        [_vp, ctypes.c_int, ctypes.c_int, ctypes.POINTER(_u8p)],
    ),
    "fl_punt_clear": (None, [_vp]),
    "fl_run": (
        ctypes.c_int,
        [_vp, ctypes.POINTER(PollItem), ctypes.c_int, ctypes.c_long, ctypes.c_long],
    ),
    "fl_enqueue": (
        ctypes.c_int64,
        [
            _vp,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_int,
            ctypes.c_double,
            ctypes.c_double,
            ctypes.c_int,
            ctypes.c_int,
        ],
    ),
    "fl_info": (ctypes.c_int, [_vp, _u64, ctypes.POINTER(ReqInfo)]),
    "fl_fail": (
        ctypes.c_int,
        [
            _vp,
            ctypes.POINTER(_u64),
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.POINTER(ReqInfo),
        ],
    ),
    "fl_forget": (ctypes.c_int, [_vp, _u64]),
    "fl_sweep": (
        ctypes.c_int,
        [
            _vp,
            ctypes.c_double,
            ctypes.c_double,
            ctypes.POINTER(_u64),
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(_u64),
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(_u64),
            ctypes.c_int,
        ],
    ),
}
