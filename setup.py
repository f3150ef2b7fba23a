"""`pip install .`: the aoe command (aoe.py), its manual page aoe.py(8) and, where a C
compiler is found, its compiled helper; without one, aoe.py runs its pure-Python path.
The metadata is in pyproject.toml."""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aoe  # noqa: E402
import build_ffi  # noqa: E402

MAN_PAGE = os.path.join("build", "man", aoe.MAN_PAGE)


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


class BuildWithManPage(build_py):
    """Also write aoe.py(8), made from the aoe.py being built, for data_files to install."""

    def run(self):
        super().run()
        os.makedirs(os.path.dirname(MAN_PAGE), exist_ok=True)
        with open(MAN_PAGE, "w") as f:
            f.write(aoe.man_page(aoe.build_parser()))


setup(ext_modules=[build_ffi.extension(os.path.join("build", "cffi"))],
      data_files=[(os.path.join("share", "man", "man%d" % aoe.MAN_SECTION), [MAN_PAGE])],
      cmdclass={"build_ext": OptionalHelper, "build_py": BuildWithManPage})
