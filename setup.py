"""Build hook for the optional C accelerators (all metadata is in pyproject.toml).

* ``wiretun._speedups``: the session's per-packet loops (wiretun.session has them in pure Python). They
  drive a Linux TUN queue (readv/writev), so it is built on Linux only: on Windows wiretun talks to
  wintun.dll through ctypes and there is nothing to compile.
* ``wiretun.wireguard._wgcrypto``: WireGuard transport packets sealed and opened in batches with the GIL
  released, on OpenSSL's libcrypto (Debian's libssl-dev); wiretun.wireguard.batch has them in pure
  Python on ``cryptography``.

Both are optional. If one cannot be built (no compiler, no Python or OpenSSL headers, a big-endian host)
the install goes on without it and says so.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing when the C accelerator cannot be compiled."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # distutils raises several unrelated error classes here
            self._skip("the C extensions", exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(ext.name, exc)

    @staticmethod
    def _skip(name: str, exc: BaseException) -> None:
        print(
            f"WARNING: could not build {name} ({exc}); wiretun works without it, on its slower "
            f"pure-Python path (install a C compiler and the Python and OpenSSL headers, e.g. Debian's "
            f"gcc, libc6-dev, python3-dev and libssl-dev, then reinstall to get it)",
            file=sys.stderr,
        )


_LINUX = sys.platform.startswith("linux")

setup(
    ext_modules=[] if not _LINUX else [
        Extension(
            "wiretun._speedups",
            sources=["src/wiretun/_speedups.c"],
            extra_compile_args=["-O2", "-std=c99", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
        Extension(
            "wiretun.wireguard._wgcrypto",
            sources=["src/wiretun/wireguard/_wgcrypto.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-std=c99", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
