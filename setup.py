"""Builds the one native piece: the block hook that ends Unicorn slices exactly."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "supervisor._fuel",
            sources=["supervisor/_fuel.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
