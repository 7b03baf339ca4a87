"""Builds the optional C pre-tokenizer and merge loop; scratchlm works without them (pure Python, slower)."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """A missing compiler must not stop the install: fall back to the pure-Python pre-tokenizer."""

    def run(self):
        try:
            super().run()
        except Exception as exc:
            print(f"warning: the C extensions were not built ({exc}); using the pure-Python path")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"warning: {ext.name} was not built ({exc}); using the pure-Python path")


setup(
    ext_modules=[
        Extension(f"scratchlm.tokenizer.{name}", [f"src/scratchlm/tokenizer/{name}.c"], extra_compile_args=["-O3"])
        for name in ("_pretok", "_merge")
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
