"""Build the C fast path; everything else lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "edgevirt.backend.virtq._ring",
            sources=["edgevirt/backend/virtq/_ring.c", "edgevirt/backend/virtq/_blk.c"],
            depends=["edgevirt/backend/virtq/_ring.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        )
    ]
)
