"""Build the C fast path; everything else lives in pyproject.toml.

The asynchronous blk path uses io_uring through liburing (Debian liburing-dev, a "core" host
requirement); where its header is missing the extension still builds, and BlkAio then runs
on its thread pool (``edgevirt backend status`` shows which).
"""

import os
import sysconfig

from setuptools import Extension, setup


def _have_liburing() -> bool:
    if os.environ.get("EDGEVIRT_NO_LIBURING"):
        return False
    dirs = [sysconfig.get_config_var("INCLUDEDIR") or "/usr/include", "/usr/include",
            "/usr/local/include"]
    return any(os.path.isfile(os.path.join(d, "liburing.h")) for d in dirs)


URING = _have_liburing()

setup(
    ext_modules=[
        Extension(
            "edgevirt.backend.virtq._ring",
            sources=[
                "edgevirt/backend/virtq/_ring.c",
                "edgevirt/backend/virtq/_blk.c",
                "edgevirt/backend/virtq/_aio.c",
                "edgevirt/backend/virtq/_aiopool.c",
                "edgevirt/backend/virtq/_aiothread.c",
            ],
            depends=["edgevirt/backend/virtq/_ring.h", "edgevirt/backend/virtq/_aio.h"],
            define_macros=[("HAVE_LIBURING", "1")] if URING else [],
            libraries=["uring"] if URING else [],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration",
                                "-pthread"],
            extra_link_args=["-pthread"],
        ),
        Extension(
            "edgevirt.backend._sigbus",
            sources=["edgevirt/backend/_sigbus.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        ),
    ]
)
