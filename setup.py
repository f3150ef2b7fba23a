"""`pip install .`: the aoe command (aoe.py) and, where a C compiler is found, its compiled
helper; without one, aoe.py runs its pure-Python path.  The metadata is in pyproject.toml."""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_ffi  # noqa: E402


class OptionalHelper(build_ext):
    """Build the helper if this machine can; never fail the install over it."""

    def run(self):
        try:
            super().run()
        except Exception as e:               # no compiler, no headers: the pure-Python path
            self.warn("aoe.py's compiled helper was not built (%s); "
                      "aoe.py uses its pure-Python path" % e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            self.warn("aoe.py's compiled helper was not built (%s); "
                      "aoe.py uses its pure-Python path" % e)


setup(ext_modules=[build_ffi.extension(os.path.join("build", "cffi"))],
      cmdclass={"build_ext": OptionalHelper})
