#!/usr/bin/env python3
"""Build aoe.py's compiled helper: `python3 build_ffi.py` (needs cffi and a C compiler).

Compiles _aoeio.c into the _aoeio extension module (cffi, out-of-line API mode)
and puts it next to this file, whatever the current directory.  The build runs
in a temporary directory that is removed afterwards.

`python3 build_ffi.py --sanitize` builds it with AddressSanitizer and
UndefinedBehaviorSanitizer, stopping at the first report.  The interpreter is
not built with them, so ASan's runtime must be loaded first:
    LD_PRELOAD=$(cc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
        python3 -m pytest -m "codec or engine" test_aoe.py
(leak checking is off: the interpreter keeps memory to the end on purpose).
Build again without --sanitize for normal use.
"""

import os
import re
import shutil
import sys
import tempfile

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))

# What Python sees of _aoeio.c is written there once, in its ABI-BEGIN ... ABI-END
# blocks (see the top of that file); only the kernel's structs that the helper's
# functions take are declared here, as <linux/ublk_cmd.h> defines them ("...;"
# lets the compiler place the fields Python does not use).
KERNEL_CDEF = """
struct ublksrv_ctrl_dev_info {
    uint16_t nr_hw_queues; uint16_t queue_depth; uint16_t state;
    uint32_t max_io_buf_bytes; uint32_t dev_id; int32_t ublksrv_pid; uint64_t flags;
    ...;
};
struct ublk_dev_params {
    uint64_t dev_sectors; uint32_t attrs;
    uint8_t logical_bs_shift, physical_bs_shift, io_min_shift, io_opt_shift;
    uint32_t max_sectors, max_discard_sectors, max_write_zeroes_sectors, discard_granularity;
};
"""
ABI_BLOCK = re.compile(r"/\* ABI-BEGIN.*?\*/(.*?)/\* ABI-END \*/", re.S)


INLINE_BODY = re.compile(r"^static inline ([^;{]*\))\s*\{.*?^\}$", re.S | re.M)


def cdef_from(source):
    """cffi's cdef from the C source's ABI blocks: a struct's fields after its "private"
    line become "...;", every #define's value and every array length named by a constant
    is left for the compiler to fill in ("..."), and a static inline function is declared
    by its prototype (Python calls the one definition)."""
    blocks = ABI_BLOCK.findall(source)
    if not blocks:
        raise cffi.CDefError("_aoeio.c has no ABI-BEGIN ... ABI-END block")
    text = "\n".join(blocks)
    text = INLINE_BODY.sub(r"\1;", text)
    text = re.sub(r"/\* private \*/.*?\n};", "...;\n};", text, flags=re.S)
    text = re.sub(r"^#define\s+(\w+)\s.*$", r"#define \1 ...", text, flags=re.M)
    text = re.sub(r"\[[A-Z_][A-Z0-9_]*\]", "[...]", text)
    return KERNEL_CDEF + text


SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


def make_ffi(sanitize=False):
    """The cffi builder of the _aoeio module, from _aoeio.c."""
    with open(os.path.join(HERE, "_aoeio.c")) as f:
        source = f.read()
    ffi = cffi.FFI()
    ffi.cdef(cdef_from(source))
    if sanitize:
        ffi.set_source("_aoeio", source, extra_link_args=SANITIZE,
                       extra_compile_args=["-O1", "-g", "-Wall", "-fno-omit-frame-pointer"]
                       + SANITIZE)
    else:
        ffi.set_source("_aoeio", source, extra_compile_args=["-O2", "-Wall"])
    return ffi


def extension(tmpdir):
    """The module as a setuptools Extension, its C source generated into tmpdir (setup.py)."""
    return make_ffi().distutils_extension(tmpdir=tmpdir)


def build(sanitize=False):
    """Compile and install the module next to this file; returns its path."""
    ffi = make_ffi(sanitize)
    with tempfile.TemporaryDirectory(prefix="aoeio-build-") as tmp:
        built = ffi.compile(tmpdir=tmp)
        dest = os.path.join(HERE, os.path.basename(built))
        staged = os.path.join(HERE, "." + os.path.basename(built) + ".new")
        shutil.copyfile(built, staged)
        os.replace(staged, dest)                  # a running aoe.py keeps its old copy
    return dest


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["--sanitize"]):
        sys.exit("usage: build_ffi.py [--sanitize]")
    try:
        print("built", build(sanitize=sys.argv[1:] == ["--sanitize"]))
    except (cffi.CDefError, cffi.VerificationError, OSError) as e:
        sys.exit("build_ffi.py: %s" % e)
