"""Builds the optional C extensions (the pre-tokenizer, the merge loop, the fused CPU kernels, MinHash); scratchlm
works without them (pure Python / PyTorch, slower)."""

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
        Extension("scratchlm.tokenizer._pretok", ["src/scratchlm/tokenizer/_pretok.c"], extra_compile_args=["-O3"]),
        Extension("scratchlm.tokenizer._merge", ["src/scratchlm/tokenizer/_merge.c"], extra_compile_args=["-O3"]),
        Extension("scratchlm.curate._minhash", ["src/scratchlm/curate/_minhash.c"], extra_compile_args=["-O3"]),
        *(
            Extension(  # flags: see the head of _cpu.h
                f"scratchlm.model.{name}",
                [f"src/scratchlm/model/{name}.c"],
                depends=["src/scratchlm/model/_cpu.h", "src/scratchlm/model/_matvec.h"],
                extra_compile_args=["-O3", "-fno-trapping-math", "-fopenmp"],
                extra_link_args=["-fopenmp"],
            )
            for name in ("_kernels", "_attention", "_quant", "_decode")
        ),
        Extension(
            "scratchlm.serve._paged",
            ["src/scratchlm/serve/_paged.c"],
            depends=["src/scratchlm/model/_cpu.h"],
            extra_compile_args=["-O3", "-fno-trapping-math", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        ),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
