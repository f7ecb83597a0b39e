"""Only the C helper lives here; everything else is declared in pyproject.toml."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "stagepool.common.ring._atomics",
            sources=["common/ring/_atomics.c"],
            extra_compile_args=["-O2", "-std=c11"],
        )
    ]
)
