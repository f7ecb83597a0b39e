"""Only the C helpers live here; everything else is declared in pyproject.toml."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "stagepool.common.ring._atomics",
            sources=["common/ring/_atomics.c"],
            extra_compile_args=["-O2", "-std=c11"],
        ),
        Extension(
            "stagepool.common.transfer._checksum",
            sources=["common/transfer/_checksum.c"],
            extra_compile_args=["-O3", "-std=c11"],
        ),
    ]
)
