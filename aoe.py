#!/usr/bin/env python3
"""aoe.py - a user-space ATA over Ethernet (AoE r11) initiator and target.

Finds AoE targets on the LAN, shows, probes and configures them, reads and
writes them, attaches them as block devices (through ublk or NBD), and serves
files or disks as targets - without the kernel's aoe module.  One file,
standard library only; an optional compiled helper (_aoeio, built by
build_ffi.py) moves frames in batches for speed.

The file reads top to bottom, each section using only those above it:

    what Python 3.6 lacks -> constants -> codec -> transport -> discovery and control queries
    -> engine (windowed ATA I/O) -> block backends (ublk, nbd)
    -> attach daemon -> target (serve) -> commands
    -> lab and demo (NetLab, the demo verb) -> CLI (with the aoetools drop-in:
       aoe.py run as aoe-stat, aoeping, ...)
"""

import abc
import argparse
import bisect
import collections
import contextlib
import ctypes
import errno
import fcntl
import fnmatch
import gc
import getopt
import hashlib
import heapq
import io
import json
import mmap
import os
import pwd
import queue
import random
import re
import select
import shutil
import shlex
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

__version__ = "0.1.0"
PROG = "aoe.py"
# attached devices' records and logs, the allow-list
DEFAULT_RUN_DIR = "/run/aoe"
RUN_DIR = os.environ.get("AOE_RUN_DIR", DEFAULT_RUN_DIR)
ATTACH_ALL_LOG = "attach-all.log"        # in RUN_DIR: attach --all's, once in the background


# =============================================================================
# Python 3.6: what it lacks, filled in once each (newer Pythons use their own)
# =============================================================================

if hasattr(time, "monotonic_ns"):
    def now_us():
        """The monotonic clock in whole microseconds."""
        return time.monotonic_ns() // 1000
else:                                    # Python 3.6 lacks time.monotonic_ns
    def now_us():
        """The monotonic clock in whole microseconds."""
        return int(time.monotonic() * 1e6)

# Python 3.6 lacks gc.freeze: a forked daemon then shares less of its parent's memory
freeze_gc_heap = getattr(gc, "freeze", lambda: None)

if hasattr(os, "preadv"):
    def pread_into(fd, buffer, offset):
        """Read into buffer itself (O_DIRECT's aligned one) from offset; returns the count."""
        return os.preadv(fd, [buffer], offset)

    def pwrite_from(fd, buffer, offset):
        """Write buffer itself (O_DIRECT's aligned one) at offset; returns the count."""
        return os.pwritev(fd, [buffer], offset)
else:                                    # Python 3.6 lacks os.preadv and os.pwritev
    def c_library_at_offset(name):
        """The C library's pread64 or pwrite64, on the memory of a writable buffer."""
        call = getattr(ctypes.CDLL(None, use_errno=True), name)
        call.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64)
        call.restype = ctypes.c_ssize_t

        def at_offset(fd, buffer, offset):
            n = call(fd, ctypes.addressof(ctypes.c_char.from_buffer(buffer)), len(buffer), offset)
            if n < 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
            return n
        return at_offset

    pread_into = c_library_at_offset("pread64")
    pwrite_from = c_library_at_offset("pwrite64")


# =============================================================================
# Constants: wire values named as in the AoE r11 spec and the kernel headers
# =============================================================================

ETH_P_AOE = 0x88A2
ETH_ALEN = 6
ETH_HLEN = 14
ETH_ZLEN = 60                    # minimum frame length without FCS
BROADCAST_MAC = b"\xff" * ETH_ALEN

AOE_HVER = 0x10                  # protocol version 1, in the high nibble
AOEFL_RSP = 0x08                 # flags (low nibble): response
AOEFL_ERR = 0x04                 # flags: error, see AOEERR_*
AOE_SHELF_ANY = 0xFFFF           # broadcast shelf (major)
AOE_SLOT_ANY = 0xFF              # broadcast slot (minor)
AOE_MAX_SHELF = 0xFFFE
AOE_MAX_SLOT = 0xFE

AOECMD_ATA = 0
AOECMD_CFG = 1
AOECMD_MASK = 2
AOECMD_RESERVE = 3

AOEERR_BADCMD = 1
AOEERR_BADARG = 2
AOEERR_DEVUNAVAIL = 3
AOEERR_CFGSET = 4
AOEERR_BADVER = 5
AOEERR_RESERVED = 6
AOE_ERROR_NAMES = {
    AOEERR_BADCMD: "unrecognized command code",
    AOEERR_BADARG: "bad argument parameter",
    AOEERR_DEVUNAVAIL: "device unavailable",
    AOEERR_CFGSET: "config string present",
    AOEERR_BADVER: "unsupported version",
    AOEERR_RESERVED: "target is reserved",
}

AOEAFL_EXT = 0x40                # 48-bit LBA
AOEAFL_DEV = 0x10                # obsolete device bit
AOEAFL_ASYNC = 0x02
AOEAFL_WRITE = 0x01

AOECCMD_READ = 0                 # Query Config sub-commands
AOECCMD_TEST = 1
AOECCMD_PTEST = 2
AOECCMD_SET = 3
AOECCMD_FSET = 4
CCMD_NAMES = {"read": AOECCMD_READ, "test": AOECCMD_TEST, "prefix": AOECCMD_PTEST,
              "set": AOECCMD_SET, "fset": AOECCMD_FSET}
AOE_MAX_CONFIG = 1024

MCMD_READ = 0                    # Mac Mask List
MCMD_EDIT = 1
DCMD_NONE = 0
DCMD_ADD = 1
DCMD_DELETE = 2
MERROR_UNSPEC = 1
MERROR_BADDIR = 2
MERROR_FULL = 3
MERROR_NAMES = {MERROR_UNSPEC: "unspecified error", MERROR_BADDIR: "bad directive",
                MERROR_FULL: "mask list full"}

RCMD_READ = 0                    # Reserve/Release
RCMD_SET = 1
RCMD_FORCE = 2

ATA_CMD_PIO_READ = 0x20
ATA_CMD_PIO_READ_EXT = 0x24
ATA_CMD_PIO_WRITE = 0x30
ATA_CMD_PIO_WRITE_EXT = 0x34
ATA_CMD_CHK_POWER = 0xE5
ATA_CMD_FLUSH = 0xE7
ATA_CMD_FLUSH_EXT = 0xEA
ATA_CMD_ID_ATA = 0xEC

ATA_BUSY = 0x80                  # status bits
ATA_DRDY = 0x40
ATA_DF = 0x20
ATA_DRQ = 0x08
ATA_ERR = 0x01
ATA_ICRC = 0x80                  # error bits
ATA_UNC = 0x40
ATA_IDNF = 0x10
ATA_ABORTED = 0x04
ATA_ERROR_NAMES = {ATA_ICRC: "interface CRC", ATA_UNC: "uncorrectable data",
                   ATA_IDNF: "sector not found (past the end)", ATA_ABORTED: "command aborted"}

SECTOR_SIZE = 512
AOE_HDR_LEN = 24                 # Ethernet + AoE common header
ATA_HDR_LEN = AOE_HDR_LEN + 12   # ... + ATA header: 36 bytes before data
LBA28_MAX = 0x0FFFFFFF

# Tags: bit 31 marks user-space initiators (the kernel driver leaves it clear,
# aoetools set it); bit 30 separates the data engine from control queries.
TAG_USER = 1 << 31
TAG_ENGINE = 1 << 30

# Defaults, as the Linux driver's module parameters.
DEFAULT_DEADSECS = 180           # aoe_deadsecs
DEFAULT_MAXOUT = 64              # aoe_maxout: cap on any target's window
DEFAULT_SECTORS_PER_FRAME = 2    # used when a target advertises 0
DISCOVER_WAIT = 1.0              # seconds to gather Query Config answers
DISCOVER_SENDS = 3               # Query Config broadcasts spread over that time (lossy links)
QUERY_TIMEOUT = 1.0              # per try of a unicast control query
QUERY_TRIES = 3

# Exit codes, and what each means (the man page's EXIT STATUS).
EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT     # as a shell reports a command Control-C ended
EXIT_MEANINGS = {EXIT_OK: "success",
                 EXIT_FAIL: "nothing answered, the target reported an error, or data did not "
                            "match",
                 EXIT_USAGE: "bad input: usage, an unknown or down interface, missing privilege",
                 EXIT_INTERRUPTED: "interrupted by SIGINT (Control-C)"}

# Linux interface facts (from <linux/if.h>, <linux/if_arp.h>, <linux/if_packet.h>).
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
ARPHRD_ETHER = 1
PACKET_IGNORE_OUTGOING = 23
SOL_PACKET = 263
# <asm-generic/socket.h>: past net.core.rmem_max/wmem_max (CAP_NET_ADMIN).  Other
# numbers on mips, sparc, alpha and parisc, where only the capped options are used.
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOCKET_BUFFER_BYTES = 4 << 20    # each way; the kernel doubles it for its bookkeeping

# ublk, from <linux/ublk_cmd.h>: command numbers (the helper sends them ioctl-encoded),
# request ops, device flags and attributes, device states.
UBLK_CMD_DEL_DEV = 0x05
UBLK_CMD_START_DEV = 0x06
UBLK_CMD_STOP_DEV = 0x07
UBLK_CMD_START_USER_RECOVERY = 0x10
UBLK_CMD_END_USER_RECOVERY = 0x11
UBLK_CMD_UPDATE_SIZE = 0x15
UBLK_CMD_QUIESCE_DEV = 0x16
UBLK_IO_OP_READ = 0
UBLK_IO_OP_WRITE = 1
UBLK_IO_OP_FLUSH = 2
UBLK_IO_OP_DISCARD = 3
UBLK_IO_OP_WRITE_ZEROES = 5
UBLK_F_USER_RECOVERY = 1 << 3
UBLK_F_USER_RECOVERY_REISSUE = 1 << 4
UBLK_F_CMD_IOCTL_ENCODE = 1 << 6
UBLK_F_UPDATE_SIZE = 1 << 10
UBLK_F_QUIESCE = 1 << 12
IORING_SETUP_COOP_TASKRUN = 1 << 8
UBLK_ATTR_READ_ONLY = 1 << 0
UBLK_ATTR_VOLATILE_CACHE = 1 << 2
UBLK_S_DEV_DEAD = 0
UBLK_S_DEV_LIVE = 1
UBLK_S_DEV_QUIESCED = 2

# NBD's transmission protocol, from <linux/nbd.h>: what the kernel's nbd driver sends
# on its socket and reads back.
NBD_REQUEST_MAGIC = 0x25609513
NBD_REPLY_MAGIC = 0x67446698
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC, NBD_CMD_FLUSH = 0, 1, 2, 3
NBD_CMD_FLAG_FUA = 1 << 16
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
# magic, type (flags << 16 | command), handle, offset, length
NBD_REQUEST = struct.Struct(">II8sQI")
NBD_REPLY = struct.Struct(">II8s")       # magic, error, handle


class AoeError(Exception):
    """A failure to report as one line; `code` is the process exit status."""

    def __init__(self, message, code=EXIT_FAIL):
        super().__init__(message)
        self.code = code


def usage_error(message):
    return AoeError(message, EXIT_USAGE)


# =============================================================================
# Codec: frames to and from bytes.  No sockets, no clocks.
# =============================================================================

_COMMON = struct.Struct(">6s6sHBBHBBI")          # 24 bytes
_ATA = struct.Struct("<BBBB6sxx")                 # aflags, err/feature, count, cmd/status, lba
_CFG = struct.Struct(">HHBBH")                    # bufcnt, fwver, scnt, ver|ccmd, len
_MASK = struct.Struct(">BBBB")                    # reserved, mcmd, merror, dir count
_RES = struct.Struct(">BB")                       # rcmd, nmacs


def mac_str(mac):
    return ":".join("%02x" % b for b in mac)


def parse_mac(text):
    """Accepts 00:11:22:33:44:55, 00-11-..., or 001122334455."""
    digits = text.replace(":", "").replace("-", "").replace(".", "")
    try:
        mac = bytes.fromhex(digits)
    except ValueError:
        mac = b""
    if len(mac) != ETH_ALEN:
        raise usage_error("%r is not a MAC address (want six hex bytes, e.g. 02:00:00:00:00:01)"
                          % text)
    return mac


def parse_device(text):
    """'e3.7' or '3.7' -> (3, 7).  Anything else is a usage error."""
    name = text[1:] if text[:1] in ("e", "E") else text
    shelf_text, dot, slot_text = name.partition(".")
    if not dot or not shelf_text.isdigit() or not slot_text.isdigit():
        raise usage_error("%r is not an AoE device name: use eSHELF.SLOT, e.g. e0.1" % text)
    shelf, slot = int(shelf_text), int(slot_text)
    if shelf > AOE_MAX_SHELF or slot > AOE_MAX_SLOT:
        raise usage_error("%s: shelf must be 0-%d and slot 0-%d"
                          % (text, AOE_MAX_SHELF, AOE_MAX_SLOT))
    return shelf, slot


def device_name(shelf, slot):
    return "e%d.%d" % (shelf, slot)


class Frame:
    """A parsed AoE frame: the common header plus the command body (a memoryview)."""

    __slots__ = ("dst", "src", "flags", "error", "shelf", "slot", "command", "tag", "body")

    @property
    def is_response(self):
        return bool(self.flags & AOEFL_RSP)

    @property
    def is_error(self):
        return bool(self.flags & AOEFL_ERR)

    def error_text(self):
        return aoe_error_text(self.error)


class FrameError(ValueError):
    """A frame that cannot be parsed; the receiver counts it under `reason`."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def aoe_error_text(code):
    return AOE_ERROR_NAMES.get(code, "unknown AoE error %d" % code)


def ata_error_text(err):
    names = [name for bit, name in ATA_ERROR_NAMES.items() if err & bit]
    return ", ".join(names) or "error register 0x%02x" % err


def pad_frame(frame):
    if len(frame) < ETH_ZLEN:
        frame += bytes(ETH_ZLEN - len(frame))
    return frame


def pack_header(dst, src, shelf, slot, command, tag, flags=0, error=0):
    return _COMMON.pack(dst, src, ETH_P_AOE, AOE_HVER | flags, error, shelf, slot, command, tag)


def parse_frame(data):
    """Bytes -> Frame.  Raises FrameError naming the drop reason."""
    if len(data) < AOE_HDR_LEN:
        raise FrameError("short")
    dst, src, etype, verfl, error, shelf, slot, command, tag = _COMMON.unpack_from(data)
    if etype != ETH_P_AOE:
        raise FrameError("not_aoe")
    if verfl & 0xF0 != AOE_HVER:
        raise FrameError("version")
    f = Frame()
    f.dst, f.src, f.flags, f.error = dst, src, verfl & 0x0F, error
    f.shelf, f.slot, f.command, f.tag = shelf, slot, command, tag
    f.body = memoryview(data)[AOE_HDR_LEN:]
    return f


def lba_bytes(lba, ext):
    """Six little-endian LBA bytes; LBA28 keeps bits 24-27 under the 0xE0 mode bits."""
    if ext:
        return (lba & 0xFFFFFFFFFFFF).to_bytes(6, "little")
    return bytes((lba & 0xFF, lba >> 8 & 0xFF, lba >> 16 & 0xFF, 0xE0 | (lba >> 24 & 0x0F), 0, 0))


def lba_value(raw, ext):
    if ext:
        return int.from_bytes(raw, "little")
    return raw[0] | raw[1] << 8 | raw[2] << 16 | (raw[3] & 0x0F) << 24


class AtaFields:
    """The ATA part of an AoE ATA frame (request or response)."""

    __slots__ = ("aflags", "err_feature", "count", "cmd_status", "lba", "data")

    def __init__(self, aflags=0, err_feature=0, count=0, cmd_status=0, lba=0, data=b""):
        self.aflags, self.err_feature, self.count = aflags, err_feature, count
        self.cmd_status, self.lba, self.data = cmd_status, lba, data

    @property
    def ext(self):
        return bool(self.aflags & AOEAFL_EXT)


def pack_ata(dst, src, shelf, slot, tag, ata, flags=0, error=0):
    head = pack_header(dst, src, shelf, slot, AOECMD_ATA, tag, flags, error)
    body = _ATA.pack(ata.aflags, ata.err_feature, ata.count, ata.cmd_status,
                     lba_bytes(ata.lba, ata.ext))
    return pad_frame(head + body + bytes(ata.data))


def parse_ata(frame):
    if len(frame.body) < _ATA.size:
        raise FrameError("short")
    aflags, ef, count, cs, raw = _ATA.unpack_from(frame.body)
    ext = bool(aflags & AOEAFL_EXT)
    return AtaFields(aflags, ef, count, cs, lba_value(raw, ext), frame.body[_ATA.size:])


class ConfigInfo:
    """Query Config Information body."""

    __slots__ = ("bufcnt", "fwver", "scnt", "aoever", "ccmd", "config")

    def __init__(self, bufcnt=0, fwver=0, scnt=0, aoever=1, ccmd=AOECCMD_READ, config=b""):
        self.bufcnt, self.fwver, self.scnt = bufcnt, fwver, scnt
        self.aoever, self.ccmd, self.config = aoever, ccmd, bytes(config)


def pack_cfg(dst, src, shelf, slot, tag, info, flags=0, error=0):
    if len(info.config) > AOE_MAX_CONFIG:
        raise usage_error("config string is %d bytes; AoE allows at most %d"
                          % (len(info.config), AOE_MAX_CONFIG))
    head = pack_header(dst, src, shelf, slot, AOECMD_CFG, tag, flags, error)
    body = _CFG.pack(info.bufcnt, info.fwver, info.scnt, (info.aoever << 4) | info.ccmd,
                     len(info.config))
    return pad_frame(head + body + info.config)


def parse_cfg(frame):
    """The config string length field decides, never the frame length (padding)."""
    if len(frame.body) < _CFG.size:
        raise FrameError("short")
    bufcnt, fwver, scnt, verccmd, length = _CFG.unpack_from(frame.body)
    if length > AOE_MAX_CONFIG or _CFG.size + length > len(frame.body):
        raise FrameError("short")
    config = bytes(frame.body[_CFG.size:_CFG.size + length])
    return ConfigInfo(bufcnt, fwver, scnt, verccmd >> 4, verccmd & 0x0F, config)


class MaskInfo:
    """Mac Mask List body: directives are (dcmd, mac) pairs."""

    __slots__ = ("mcmd", "merror", "directives")

    def __init__(self, mcmd=MCMD_READ, merror=0, directives=()):
        self.mcmd, self.merror, self.directives = mcmd, merror, list(directives)


def pack_mask(dst, src, shelf, slot, tag, info, flags=0, error=0):
    head = pack_header(dst, src, shelf, slot, AOECMD_MASK, tag, flags, error)
    body = _MASK.pack(0, info.mcmd, info.merror, len(info.directives))
    body += b"".join(bytes((0, dcmd)) + mac for dcmd, mac in info.directives)
    return pad_frame(head + body)


def parse_mask(frame):
    if len(frame.body) < _MASK.size:
        raise FrameError("short")
    _, mcmd, merror, count = _MASK.unpack_from(frame.body)
    if _MASK.size + 8 * count > len(frame.body):
        raise FrameError("short")
    dirs = []
    for i in range(count):
        off = _MASK.size + 8 * i
        dirs.append((frame.body[off + 1], bytes(frame.body[off + 2:off + 8])))
    return MaskInfo(mcmd, merror, dirs)


class ReserveInfo:
    __slots__ = ("rcmd", "macs")

    def __init__(self, rcmd=RCMD_READ, macs=()):
        self.rcmd, self.macs = rcmd, list(macs)


def pack_reserve(dst, src, shelf, slot, tag, info, flags=0, error=0):
    head = pack_header(dst, src, shelf, slot, AOECMD_RESERVE, tag, flags, error)
    return pad_frame(head + _RES.pack(info.rcmd, len(info.macs)) + b"".join(info.macs))


def parse_reserve(frame):
    if len(frame.body) < _RES.size:
        raise FrameError("short")
    rcmd, count = _RES.unpack_from(frame.body)
    if _RES.size + 6 * count > len(frame.body):
        raise FrameError("short")
    macs = [bytes(frame.body[_RES.size + 6 * i:_RES.size + 6 * i + 6]) for i in range(count)]
    return ReserveInfo(rcmd, macs)


class Identify:
    """ATA IDENTIFY DEVICE data: 256 little-endian words."""

    def __init__(self, data):
        if len(data) < SECTOR_SIZE:
            raise FrameError("short")
        self.words = struct.unpack_from("<256H", data)
        w = self.words
        self.serial = self._text(10, 20)
        self.firmware = self._text(23, 27)
        self.model = self._text(27, 47)
        self.lba28_sectors = w[60] | w[61] << 16
        self.lba48 = bool(w[83] & (1 << 10))
        self.lba48_sectors = w[100] | w[101] << 16 | w[102] << 32 | w[103] << 48
        self.sectors = (self.lba48_sectors if self.lba48 and self.lba48_sectors
                        else self.lba28_sectors)

    def _text(self, first, end):
        return self.padded_text(first, end).strip(" \0")

    def padded_text(self, first, end):
        """ATA strings hold two characters per word, high byte first, space padded."""
        raw = b"".join(struct.pack(">H", word) for word in self.words[first:end])
        return raw.decode("ascii", "replace")

    def as_dict(self):
        return {"model": self.model, "serial": self.serial, "firmware": self.firmware,
                "lba48": self.lba48, "sectors": self.sectors,
                "lba28_sectors": self.lba28_sectors, "lba48_sectors": self.lba48_sectors}


def build_identify(sectors, model, serial, firmware):
    """IDENTIFY data for a target of `sectors` sectors (what serve answers)."""
    words = [0] * 256

    def put_text(first, length, text):
        raw = text.encode("ascii", "replace")[:length].ljust(length)
        for i in range(0, length, 2):
            words[first + i // 2] = raw[i] << 8 | raw[i + 1]

    words[47] = 0x8000 | 1                      # one sector per DRQ block
    words[49] = 0x0200                          # LBA supported
    words[50] = 0x4000
    words[80] = 0x00F0                          # ATA-4..ATA-7
    words[82] = 0x4000 | 1 << 5                 # write cache supported
    words[83] = 0x4000 | 1 << 10 | 1 << 13 | 1 << 12   # LBA48, FLUSH CACHE EXT, FLUSH CACHE
    words[84] = 0x4000
    words[85] = 0x4000 | 1 << 5                 # write cache enabled
    words[86] = 0x0000 | 1 << 10 | 1 << 13 | 1 << 12
    words[87] = 0x4000
    put_text(10, 20, serial)
    put_text(23, 8, firmware)
    put_text(27, 40, model)
    lba28 = min(sectors, LBA28_MAX)
    words[60], words[61] = lba28 & 0xFFFF, lba28 >> 16
    for i in range(4):
        words[100 + i] = sectors >> (16 * i) & 0xFFFF
    return struct.pack("<256H", *words)


def frame_sectors(mtu):
    """Sectors one ATA frame carries at this MTU: the MTU holds AoE (10) + ATA (12)
    headers + data."""
    return max(0, (mtu + ETH_HLEN - ATA_HDR_LEN) // SECTOR_SIZE)


def sectors_per_frame(mtu, advertised):
    """What one frame may carry: the interface's limit, capped by the target's count."""
    n = frame_sectors(mtu)
    return min(n, advertised or DEFAULT_SECTORS_PER_FRAME)


# =============================================================================
# Transport: interfaces and AF_PACKET sockets
# =============================================================================

SYS_NET = "/sys/class/net"


class Interface:
    """A network interface as the system reports it."""

    def __init__(self, name):
        self.name = name
        base = os.path.join(SYS_NET, name)
        if not os.path.isdir(base):
            raise usage_error("%s: no such network interface (see '%s interfaces')" % (name, PROG))

        def read(attr, default=""):
            try:
                with open(os.path.join(base, attr)) as f:
                    return f.read().strip()
            except OSError:
                return default

        self.mtu = int(read("mtu", "0") or 0)
        self.flags = int(read("flags", "0") or "0", 16)
        self.type = int(read("type", "0") or 0)
        self.operstate = read("operstate", "unknown")
        mac = read("address", "")
        self.mac = parse_mac(mac) if len(mac) == 17 else bytes(6)

    @property
    def up(self):
        return bool(self.flags & IFF_UP)

    @property
    def is_ethernet(self):
        return self.type == ARPHRD_ETHER and not self.flags & IFF_LOOPBACK

    def as_dict(self):
        return {"name": self.name, "mac": mac_str(self.mac), "mtu": self.mtu, "up": self.up,
                "operstate": self.operstate, "ethernet": self.is_ethernet,
                "payload": frame_sectors(self.mtu) * SECTOR_SIZE}


def all_interfaces():
    try:
        names = sorted(os.listdir(SYS_NET))
    except OSError:
        names = []
    return [Interface(n) for n in names]


# set by aoe-interfaces, like the driver's aoe_iflist
IFLIST_FILE = os.path.join(RUN_DIR, "interfaces")


def saved_iflist():
    try:
        with open(IFLIST_FILE) as f:
            return f.read().split()
    except OSError:
        return []


def write_file(path, text):
    """Replace a file in RUN_DIR whole: readers see the old text or the new, never a part."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".new", "w") as f:
        f.write(text)
    os.replace(path + ".new", path)


def save_iflist(names):
    write_file(IFLIST_FILE, " ".join(names) + "\n")


def iflist_from(option_values):
    """The allow-list: --iface values if given, else $AOE_IFLIST, else the one aoe-interfaces
    saved, else None (all)."""
    words = []
    for value in option_values or [os.environ.get("AOE_IFLIST", "")]:
        words += value.replace(",", " ").split()
    return words or saved_iflist() or None


def select_interfaces(allow=None):
    """The interfaces AoE may use: the allow-list (checked), else all up Ethernet ones."""
    if allow:
        chosen = []
        for name in allow:
            ifc = Interface(name)
            if not ifc.is_ethernet:
                raise usage_error("%s is not an Ethernet interface; AoE needs one" % name)
            if not ifc.up:
                raise usage_error("%s is down: bring it up with 'ip link set %s up'" % (name, name))
            chosen.append(ifc)
        return chosen
    chosen = [i for i in all_interfaces() if i.is_ethernet and i.up]
    if not chosen:
        raise usage_error("no Ethernet interface is up: bring one up, or name one with --iface")
    return chosen


def size_socket_buffers(sock):
    """Room for several windows of jumbo frames.  The plain options are capped by
    net.core.rmem_max/wmem_max (208 KiB on a stock system, about one window of
    jumbo frames), so root uses the FORCE ones, which are not."""
    generic = not os.uname().machine.startswith(("mips", "sparc", "alpha", "parisc"))
    for plain, force in ((socket.SO_RCVBUF, SO_RCVBUFFORCE), (socket.SO_SNDBUF, SO_SNDBUFFORCE)):
        try:
            if not generic:
                raise OSError(errno.ENOPROTOOPT, "no generic socket option numbers")
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER_BYTES)


def open_raw_socket(ifname):
    """An AF_PACKET socket for AoE frames on one interface, not seeing our own sends."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_AOE))
    except PermissionError:
        raise AoeError("raw sockets need root or CAP_NET_RAW: run as root (sudo %s ...)" % PROG,
                       EXIT_USAGE)
    try:
        sock.bind((ifname, ETH_P_AOE))
        try:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        except OSError:
            # kernels before 4.20: R flag filtering still drops them
            pass
        size_socket_buffers(sock)
    except OSError as e:
        sock.close()
        raise usage_error("%s: cannot open an AoE socket: %s" % (ifname, e.strerror))
    sock.setblocking(False)
    return sock


class DropCounters(collections.Counter):
    """Frames received but not used, by reason; shown with -v."""

    def describe(self):
        return ", ".join("%s %d" % (k, v) for k, v in sorted(self.items()) if v) or "none"


SO_ATTACH_FILTER = 26             # <asm-generic/socket.h>; classic BPF, <linux/filter.h>:
BPF_LD_H_ABS, BPF_LD_B_ABS = 0x28, 0x30    # load the half-word / byte at an offset
BPF_JEQ_K, BPF_RET_K = 0x15, 0x06          # jump if equal to k; return k (bytes kept, 0: drop)


class Port:
    """One interface's socket: send frames, receive frames until a deadline."""

    def __init__(self, ifc):
        self.ifc = ifc
        self.name = ifc.name
        self.mac = ifc.mac
        self.sock = open_raw_socket(ifc.name)
        self.buf = bytearray(65536)

    def twin(self):
        """A socket of its own on the same interface: each attached device has one."""
        return Port(self.ifc)

    def fileno(self):
        return self.sock.fileno()

    def send(self, frame):
        try:
            self.sock.send(frame)
        except BlockingIOError:
            select.select([], [self.sock], [], 1.0)
            self.sock.send(frame)
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                raise AoeError("%s: frame of %d bytes exceeds MTU %d"
                               % (self.name, len(frame), self.ifc.mtu))
            raise AoeError("%s: send failed: %s" % (self.name, e.strerror))

    def keep_only(self, shelf, slot):
        """Have the kernel drop every frame but those of eX.Y (a socket filter), so that a
        daemon serving one device is not woken by, nor fills its buffer with, the others'."""
        code = [(BPF_LD_H_ABS, 0, 0, 16), (BPF_JEQ_K, 0, 3, shelf),       # shelf, at offset 16
                (BPF_LD_B_ABS, 0, 0, 18), (BPF_JEQ_K, 0, 1, slot),        # slot, at offset 18
                (BPF_RET_K, 0, 0, 0x40000), (BPF_RET_K, 0, 0, 0)]         # keep it all, or drop
        program = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in code))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                             struct.pack("HL", len(code), ctypes.addressof(program)))

    def recv(self):
        """One frame as bytes, or None when the socket is empty."""
        try:
            n = self.sock.recv_into(self.buf)
        except (BlockingIOError, InterruptedError):
            return None
        return bytes(self.buf[:n])

    def close(self):
        self.sock.close()


def open_ports(allow=None):
    return [Port(i) for i in select_interfaces(allow)]


def close_ports(ports):
    for p in ports:
        p.close()


def receive_until(ports, deadline, drops):
    """Yield (port, Frame) for well-formed responses until `deadline` (monotonic).

    Malformed and non-response frames are dropped and counted in `drops`."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        ready, _, _ = select.select(ports, [], [], remaining)
        for port in ready:
            for _ in range(256):
                data = port.recv()
                if data is None:
                    break
                try:
                    frame = parse_frame(data)
                except FrameError as e:
                    drops[e.reason] += 1
                    continue
                if not frame.is_response:
                    drops["not_response"] += 1
                    continue
                yield port, frame


# =============================================================================
# Discovery and control queries: Query Config, IDENTIFY, masks, reservations
# =============================================================================

# A device's state as stat shows it: a target's answer to discovery, or an attached
# device's state (STATE_DOWN and after, in the Block backends section).
STATE_UP = "up"                   # answered IDENTIFY; attached: serving I/O
STATE_UNRESPONSIVE = "unresponsive"   # answered discovery, not IDENTIFY


class Path:
    """One way to reach a target: our port and the target's MAC behind it."""

    __slots__ = ("port", "mac")

    def __init__(self, port, mac):
        self.port, self.mac = port, mac

    def __repr__(self):
        return "%s->%s" % (self.port.name, mac_str(self.mac))


class Target:
    """Everything learned about one eX.Y: its paths and its Query Config answer."""

    def __init__(self, shelf, slot, info):
        self.shelf, self.slot = shelf, slot
        self.info = info
        self.paths = []
        self.identify = None
        self.identify_error = None

    @property
    def name(self):
        return device_name(self.shelf, self.slot)

    def add_path(self, port, mac):
        if not any(p.port is port and p.mac == mac for p in self.paths):
            self.paths.append(Path(port, mac))

    @property
    def sectors_per_frame(self):
        """The frame size every path can carry (the kernel also uses the smallest)."""
        return min(sectors_per_frame(p.port.ifc.mtu, self.info.scnt) for p in self.paths)

    @property
    def sectors(self):
        return self.identify.sectors if self.identify else None

    def as_dict(self):
        d = {"device": self.name, "shelf": self.shelf, "slot": self.slot,
             "paths": [{"interface": p.port.name, "mac": mac_str(p.mac), "mtu": p.port.ifc.mtu}
                       for p in self.paths],
             "interfaces": sorted({p.port.name for p in self.paths}),
             "macs": sorted({mac_str(p.mac) for p in self.paths}),
             "buffers": self.info.bufcnt, "fwver": "0x%04x" % self.info.fwver,
             "aoe_version": self.info.aoever,
             "advertised_sectors": self.info.scnt, "sectors_per_frame": self.sectors_per_frame,
             "payload": self.sectors_per_frame * SECTOR_SIZE,
             "config": self.info.config.decode("utf-8", "replace")}
        if self.identify:
            d.update(self.identify.as_dict())
            d["size_bytes"] = self.identify.sectors * SECTOR_SIZE
            d["state"] = STATE_UP
        else:
            d["state"] = STATE_UNRESPONSIVE
            d["error"] = self.identify_error
        return d


class Control:
    """Control-plane conversations (one tag each) over a set of ports."""

    def __init__(self, ports, verbose=False):
        self.ports = ports
        self.verbose = verbose
        self.drops = DropCounters()
        self._tag = TAG_USER | random.getrandbits(29) << 1

    def next_tag(self):
        self._tag = TAG_USER | ((self._tag + 1) & (TAG_ENGINE - 1))
        return self._tag

    def _broadcast(self, ports, build):
        tag = self.next_tag()
        for port in ports:
            port.send(build(port, BROADCAST_MAC, tag))
        return tag

    def _answers(self, tags, deadline, want=None):
        """Responses carrying one of `tags` (None: any); `want(frame)` rejects others' answers
        (counted)."""
        for port, frame in receive_until(self.ports, deadline, self.drops):
            if (tags is not None and frame.tag not in tags) or frame.shelf == AOE_SHELF_ANY or \
                    frame.slot == AOE_SLOT_ANY:
                self.drops["unsolicited"] += 1
                continue
            if want is not None and not want(frame):
                self.drops["foreign"] += 1
                continue
            yield port, frame

    def query_config(self, shelf=AOE_SHELF_ANY, slot=AOE_SLOT_ANY, ccmd=AOECCMD_READ, config=b"",
                     wait=DISCOVER_WAIT, ports=None, first_only=False, announced=False):
        """Broadcast Query Config; returns [(port, frame, ConfigInfo or None)] in arrival order.
        announced: also the answers nobody here asked for (a target announcing itself as it
        starts, answers to other initiators)."""
        ports = ports or self.ports
        request = ConfigInfo(ccmd=ccmd, config=config)

        def build(port, dst, tag):
            return pack_cfg(dst, port.mac, shelf, slot, tag, request)

        tag = self._broadcast(ports, build)
        results, seen = [], set()
        want = lambda f: (f.command == AOECMD_CFG and shelf in (AOE_SHELF_ANY, f.shelf)
                          and slot in (AOE_SLOT_ANY, f.slot))
        # a read is asked again within the window (same tag), so one lost frame loses nothing
        sends = DISCOVER_SENDS if ccmd == AOECCMD_READ else 1
        start = time.monotonic()
        for send in range(sends):
            if send:
                for port in ports:
                    port.send(build(port, BROADCAST_MAC, tag))
            until = start + wait * (send + 1) / sends
            for port, frame in self._answers(None if announced else (tag,), until, want):
                if (port, frame.src, frame.shelf, frame.slot) in seen:    # answered already
                    continue
                seen.add((port, frame.src, frame.shelf, frame.slot))
                info = None
                if not frame.is_error:
                    try:
                        info = parse_cfg(frame)
                    except FrameError as e:
                        self.drops[e.reason] += 1
                        continue
                results.append((port, frame, info))
                if first_only:
                    return results
        return results

    def discover(self, wait=DISCOVER_WAIT, shelf=AOE_SHELF_ANY, slot=AOE_SLOT_ANY, announced=False):
        """Targets that answer a broadcast Query Config (and those that announce themselves
        meanwhile, if `announced`), in (shelf, slot) order."""
        targets = {}
        for port, frame, info in self.query_config(shelf, slot, wait=wait, announced=announced):
            if info is None:
                continue
            key = (frame.shelf, frame.slot)
            if key not in targets:
                targets[key] = Target(frame.shelf, frame.slot, info)
            targets[key].add_path(port, frame.src)
        return [targets[k] for k in sorted(targets)]

    def unicast(self, path, shelf, slot, build, command, tries=QUERY_TRIES, timeout=QUERY_TIMEOUT):
        """Send to one path and wait for its answer, resending up to `tries` times."""
        for _ in range(tries):
            tag = self.next_tag()
            path.port.send(build(path.port.mac, path.mac, tag))
            want = lambda f: (f.command == command and f.shelf == shelf and f.slot == slot
                              and f.src == path.mac)
            for _, frame in self._answers((tag,), time.monotonic() + timeout, want):
                return frame
        return None

    def ata(self, target, ata, path=None, tries=QUERY_TRIES, timeout=QUERY_TIMEOUT):
        """One ATA command to a target; returns the response Frame or None."""
        path = path or target.paths[0]

        def build(src, dst, tag):
            return pack_ata(dst, src, target.shelf, target.slot, tag, ata)

        return self.unicast(path, target.shelf, target.slot, build, AOECMD_ATA, tries, timeout)

    def identify(self, targets, timeout=QUERY_TIMEOUT, tries=QUERY_TRIES):
        """IDENTIFY every target at once; fills target.identify or target.identify_error."""
        pending = {t: None for t in targets if t.paths}
        for attempt in range(tries):
            if not pending:
                break
            tags = {}
            for t in pending:
                tag = self.next_tag()
                path = t.paths[attempt % len(t.paths)]
                req = AtaFields(count=1, cmd_status=ATA_CMD_ID_ATA, lba=0)
                path.port.send(pack_ata(path.mac, path.port.mac, t.shelf, t.slot, tag, req))
                tags[tag] = t
            want = lambda f: f.command == AOECMD_ATA and f.tag in tags and \
                (f.shelf, f.slot) == (tags[f.tag].shelf, tags[f.tag].slot)
            for _, frame in self._answers(tags, time.monotonic() + timeout, want):
                t = tags.pop(frame.tag)
                pending.pop(t, None)
                t.identify, t.identify_error = self._identify_result(frame)
                if not tags:
                    break
        for t in pending:
            t.identify_error = t.identify_error or "no answer to IDENTIFY"

    @staticmethod
    def _identify_result(frame):
        if frame.is_error:
            return None, "AoE error: %s" % frame.error_text()
        try:
            ata = parse_ata(frame)
            if ata.cmd_status & ATA_ERR:
                return None, "ATA error: %s" % ata_error_text(ata.err_feature)
            return Identify(ata.data), None
        except FrameError:
            return None, "IDENTIFY answer too short"


def find_targets(control, devices=None, wait=DISCOVER_WAIT, identify=True):
    """Discover, optionally narrowed to `devices` [(shelf, slot)], then IDENTIFY them."""
    if devices and len(devices) == 1:
        targets = control.discover(wait, *devices[0])
    else:
        targets = control.discover(wait)
        if devices:
            targets = [t for t in targets if (t.shelf, t.slot) in set(devices)]
    if identify:
        control.identify(targets)
    return targets


def find_target(control, device, wait=DISCOVER_WAIT):
    """The one target named `device` (e.g. 'e0.1'), identified, or a clear error."""
    shelf, slot = parse_device(device)
    for _ in range(QUERY_TRIES):                  # a broadcast and its answer can be lost too
        targets = find_targets(control, [(shelf, slot)], wait)
        if targets:
            break
    if not targets:
        names = ", ".join(p.name for p in control.ports)
        raise AoeError("%s: no answer on %s (is the target running? see '%s discover')"
                       % (device_name(shelf, slot), names, PROG))
    target = targets[0]
    if target.identify is None:
        raise AoeError("%s: %s" % (target.name, target.identify_error))
    return target


# =============================================================================
# Engine: windowed ATA I/O to one target over all its paths
# =============================================================================
#
# The pump moves frames (split requests, tag, send, match, copy, notice
# expiry); the Engine decides (windows, retransmit timeouts, failover, dead
# target).  The compiled helper provides a fast pump; PyPump is the same
# mechanism in Python, used when the helper is not built.
#
# A frame keeps one tag slot from submit to completion; each transmission
# gets the slot's next generation, and the tag is TAG_USER | TAG_ENGINE |
# generation << 16 | slot << 1 | parity (even over all 32 bits, so a tag with
# one bit flipped names no frame).  An answer counts for any transmission of
# the frame, so one that comes after the frame was resent shows the resend was
# spurious; and only when its ATA header echoes the frame's (write and LBA48
# flags, LBA, at most its sector count), so a misdirected answer never lands
# in the wrong place.

OP_READ, OP_WRITE, OP_FLUSH = 0, 1, 2
STATUS_AOE_ERROR = 0x100         # status -(0x100 | AoE error code)
STATUS_ATA_ERROR = 0x200         # status -(0x200 | ATA error register)
MIN_RTO_US = 2000
MAX_RTO_US = 4000000
INITIAL_RTO_US = 250000          # before any sample (the kernel starts at 250 ms too)
PATH_LOST_LIMIT = 4              # expiries with no answer before a path counts as silent
PATH_RETRY_US = 2000000          # a silent path is tried again after this
MAX_FRAMES = 1 << 15             # tag slots per engine (bits 1-15 of the tag)
MAX_PATHS = 16                   # paths one engine uses at most
GEN_MAX = 0x3FFF                 # generations run 1..GEN_MAX (bits 16-29)
MIN_REORDER_US = 200             # a frame overtaken by an answer is lost after this at least
REORDER_MAX_FACTOR = 64          # ... and after at most this many quarter round trips
REORDER_SHRINK_AFTER = 16        # rounds with resends needed and none spurious before it shrinks
SPIN_US = 30                     # the helper's pump polls this long for answers before it
SPIN_RTT_US = 200                # ... sleeps, while a path's smoothed round trip is this short
LONE_SPIN_RTTS = 2               # a lone bridged request (qd1): poll for its answer and the next
LONE_SPIN_MAX_US = 1000          # ... request this many round trips, at most this long
LOSS_WEIGHT = 1 / 64             # how far one answer moves the loss estimate
LOSS_CONGESTED = 0.25            # above this share of answers that only a resend got, the
                                 # window is halved
PUMP_COUNTERS = ("frames_sent", "frames_resent", "frames_recv", "bytes_data", "resent_needed",
                 "resent_spurious", "send_eagain", "errors", "frames_in_place")
PUMP_DROPS = ("short", "not_response", "version", "foreign", "bad_tag", "stale", "late", "bad_mac",
              "echo")


def status_text(status):
    """Engine status (0 or negative) -> words."""
    code = -status
    if code & STATUS_ATA_ERROR:
        return "ATA error: " + ata_error_text(code & 0xFF)
    if code & STATUS_AOE_ERROR:
        return "AoE error: " + aoe_error_text(code & 0xFF)
    return os.strerror(code)


def ata_opcode(op, ext, flush_cmd=ATA_CMD_FLUSH_EXT):
    if op == OP_FLUSH:
        return flush_cmd
    base = ATA_CMD_PIO_WRITE if op == OP_WRITE else ATA_CMD_PIO_READ
    return base | (0x04 if ext else 0)


def next_gen(gen):
    return gen % GEN_MAX + 1


class PumpPath:
    """Per-path state shared by pump and engine: the fields of the helper's struct aoe_path
    (helper_mismatch checks them when the helper loads)."""

    __slots__ = ("index", "port", "src", "dst", "maxout", "outstanding", "enabled", "rto_us",
                 "reorder_us", "newest_answered_us", "sent", "recv", "last_recv_us", "rtt_n",
                 "rtt_sum_us", "rtt_max_us", "spurious", "needed", "late", "header", "head")

    def __init__(self, index, port, dst):
        self.index, self.port, self.src, self.dst = index, port, port.mac, dst
        self.maxout, self.outstanding, self.enabled = 1, 0, 1
        self.rto_us = self.reorder_us = INITIAL_RTO_US
        self.newest_answered_us = self.sent = self.recv = self.last_recv_us = 0
        self.rtt_n = self.rtt_sum_us = self.rtt_max_us = 0   # answers during the last pump
        self.spurious = self.needed = self.late = 0


FRAME_PENDING, FRAME_INFLIGHT, FRAME_DONE = 1, 2, 3


class PumpFrame:
    """One frame of a request in PyPump (struct aoe_frame in the helper)."""

    __slots__ = ("slot", "req", "lba", "raw_lba", "nsect", "offset", "state", "path", "reported",
                 "ntx", "gen", "tag", "sent_us", "before_path", "before_sent_us", "done_back")

    def __init__(self, slot, req, lba, raw_lba, nsect, offset):
        self.slot, self.req, self.lba, self.raw_lba = slot, req, lba, raw_lba
        self.nsect, self.offset = nsect, offset
        self.state, self.path, self.reported, self.ntx = FRAME_PENDING, None, False, 0
        self.gen = self.tag = self.sent_us = self.before_sent_us = 0   # of the latest sending
        self.before_path = None                             # of the one before it
        self.done_back = None                               # once done: which one was answered


class PumpRequest:
    """A request in PyPump (struct aoe_request in the helper)."""

    __slots__ = ("req_id", "op", "buf", "frames_left", "status", "aflags", "command")

    def __init__(self, req_id, op, buf, frames, aflags, command):
        self.req_id, self.op, self.buf, self.frames_left, self.status = req_id, op, buf, frames, 0
        self.aflags, self.command = aflags, command


class PyPump:
    """The frame mechanism in pure Python: one frame per system call."""

    _ATA_REQ = struct.Struct(">IBBBB6sxx")       # tag, then the ATA header
    _RSP = struct.Struct(">HBBHBBIBBBB6s")       # from offset 12: type .. ATA status, LBA

    def __init__(self, shelf, slot, lba48, spf, gen_seed, frames=MAX_FRAMES):
        self._shelf, self._slot, self._lba48, self._spf = shelf, slot, lba48, spf
        self.flush_cmd = ATA_CMD_FLUSH_EXT if lba48 else ATA_CMD_FLUSH
        self.paths = []
        self.drops = DropCounters()
        self.stats = collections.Counter()
        self._free = collections.deque(range(frames))
        self._gen = [next_gen(gen_seed)] * frames   # each slot's last generation
        # slot -> PumpFrame, waiting or done (until reused)
        self._frames = {}
        self._inflight = {}                       # slot -> PumpFrame in flight
        self._pending = collections.deque()       # frames waiting for a window (done ones skipped)
        self._requests = {}                       # req_id -> PumpRequest
        self._done = []
        self.failed = []                          # (req_id, lba, nsect, status) of failed frames
        self._rxbuf = bytearray(65536)
        self._rxview = memoryview(self._rxbuf)
        self._poller = select.poll()
        self._rr = 0

    def add_path(self, port, dst):
        path = PumpPath(len(self.paths), port, dst)
        # A read request is the header padded to the minimum frame; a write sends the
        # header (its first ATA_HDR_LEN bytes) and then the data
        path.header = bytearray(pack_header(dst, port.mac, self._shelf, self._slot, AOECMD_ATA, 0)
                                + bytes(ETH_ZLEN - AOE_HDR_LEN))
        path.head = memoryview(path.header)[:ATA_HDR_LEN]
        self.paths.append(path)
        self._poller.register(port.fileno(), select.POLLIN)
        return len(self.paths) - 1

    @property
    def busy(self):
        return bool(self._requests)

    @property
    def active_requests(self):
        return len(self._requests)

    def submit(self, req_id, op, lba, nsect, buf):
        count = 1 if op == OP_FLUSH else (nsect + self._spf - 1) // self._spf
        if count > len(self._free):
            return -errno.ENOSPC
        aflags = (AOEAFL_EXT if self._lba48 else 0) | (AOEAFL_WRITE if op == OP_WRITE else 0)
        req = PumpRequest(req_id, op, memoryview(buf).cast("B") if buf is not None else None, count,
                          aflags, ata_opcode(op, self._lba48, self.flush_cmd))
        self._requests[req_id] = req
        frames, pending, free = self._frames, self._pending, self._free
        spf, ext = self._spf, self._lba48
        if op == OP_FLUSH:
            fr = PumpFrame(free.popleft(), req, 0, lba_bytes(0, ext), 0, 0)
            frames[fr.slot] = fr
            pending.append(fr)
            return 0
        for first in range(0, nsect, spf):        # this runs per frame
            at, n = lba + first, nsect - first
            raw = (at & 0xFFFFFFFFFFFF).to_bytes(6, "little") if ext else lba_bytes(at, False)
            fr = PumpFrame(free.popleft(), req, at, raw, spf if n > spf else n, first * SECTOR_SIZE)
            frames[fr.slot] = fr
            pending.append(fr)
        return 0

    def _pick_path(self):
        n = len(self.paths)
        for i in range(n):
            p = self.paths[(self._rr + i) % n]
            if p.enabled and p.outstanding < p.maxout:
                self._rr = (self._rr + i + 1) % n
                return p
        return None

    def _send_pending(self):
        sent, t = 0, now_us()                     # one time for the batch, as the helper does
        pending, gens, inflight = self._pending, self._gen, self._inflight
        pack = self._ATA_REQ.pack_into
        one_path = self.paths[0] if len(self.paths) == 1 else None
        try:
            while pending:
                fr = pending[0]
                if fr.state != FRAME_PENDING:     # answered while waiting to be resent
                    pending.popleft()
                    continue
                if one_path is None:
                    path = self._pick_path()
                    if path is None:
                        return
                else:
                    path = one_path
                    if path.outstanding >= path.maxout or not path.enabled:
                        return
                req, slot = fr.req, fr.slot
                gen = gens[slot] % GEN_MAX + 1    # next_gen, inline: this runs per frame
                # The tag: ours, the engine's, generation, slot, and bit 0 making the ones even
                tag = TAG_USER | TAG_ENGINE | gen << 16 | slot << 1
                tag |= bin(tag).count("1") & 1
                pack(path.header, 20, tag, req.aflags, 0, fr.nsect, req.command, fr.raw_lba)
                try:
                    if req.op == OP_WRITE:
                        path.port.sock.sendmsg(
                            [path.head, req.buf[fr.offset:fr.offset + fr.nsect * SECTOR_SIZE]],
                            [], socket.MSG_DONTWAIT)
                    else:
                        path.port.sock.send(path.header, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    self.stats["send_eagain"] += 1
                    return
                pending.popleft()
                gens[slot] = gen
                if fr.ntx:
                    fr.before_path, fr.before_sent_us = fr.path, fr.sent_us
                    self.stats["frames_resent"] += 1
                fr.gen, fr.tag, fr.path, fr.sent_us, fr.reported = gen, tag, path, t, False
                fr.ntx += 1
                fr.state = FRAME_INFLIGHT
                inflight[slot] = fr
                path.outstanding += 1
                path.sent += 1
                sent += 1
        finally:
            self.stats["frames_sent"] += sent

    def _finish_frame(self, fr, status, back):
        if fr.state == FRAME_INFLIGHT:
            del self._inflight[fr.slot]
            fr.path.outstanding -= 1
        fr.state, fr.done_back = FRAME_DONE, back
        self._free.append(fr.slot)                 # FIFO: late answers find the slot still done
        req, fr.req = fr.req, None
        if status:
            self.failed.append((req.req_id, fr.lba, fr.nsect, status))
            if not req.status:
                req.status = status
        req.frames_left -= 1
        if req.frames_left == 0:
            del self._requests[req.req_id]
            self._done.append((req.req_id, req.status))

    def _path_to(self, mac):
        return next((p for p in self.paths if p.dst == mac), None)

    def _receive(self, port_index_by_fd, timeout_ms=0):
        drops, frames = self.drops, self._frames
        buf, view = self._rxbuf, self._rxview
        answers = data = 0                        # added up once: fewer dict updates
        try:
            for fd, _ in self._poller.poll(timeout_ms):
                if fd not in port_index_by_fd:    # the caller's extra_fd
                    continue
                sock = self.paths[port_index_by_fd[fd]].port.sock
                for i in range(4096):
                    if not i & 63:                # one time per 64 answers, as the helper's
                        t = now_us()              # receive batches take
                    try:
                        n = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        break
                    if n < ATA_HDR_LEN:
                        drops["short"] += 1
                        continue
                    etype, verfl, err, shelf, slot_no, cmd, tag, aflags, aerr, count, status, \
                        raw_lba = self._RSP.unpack_from(buf, 12)
                    if etype != ETH_P_AOE or verfl & 0xF0 != AOE_HVER:
                        drops["version"] += 1
                        continue
                    if not verfl & AOEFL_RSP:
                        drops["not_response"] += 1
                        continue
                    if shelf != self._shelf or slot_no != self._slot or cmd != AOECMD_ATA:
                        drops["foreign"] += 1
                        continue
                    fr = frames.get(tag >> 1 & (MAX_FRAMES - 1))
                    if fr is not None and fr.tag == tag and fr.state == FRAME_INFLIGHT:
                        back, path, sent_us = 0, fr.path, fr.sent_us   # the usual answer
                    else:
                        back = self._older_transmission(fr, tag, buf)
                        if back is None:
                            continue
                        path, sent_us = (fr.path, fr.sent_us) if back == 0 else \
                            (fr.before_path, fr.before_sent_us) if back == 1 else \
                            (self._path_to(buf[6:12]), None)
                    if path is None or path.dst != buf[6:12]:
                        drops["bad_mac"] += 1
                        continue
                    req = fr.req
                    if aflags & (AOEAFL_EXT | AOEAFL_WRITE) != req.aflags or count > fr.nsect or \
                            raw_lba != fr.raw_lba and lba_value(raw_lba, self._lba48) != fr.lba:
                        drops["echo"] += 1
                        continue
                    if verfl & AOEFL_ERR:
                        result = -(STATUS_AOE_ERROR | err)
                    elif status & (ATA_ERR | ATA_DF):
                        result = -(STATUS_ATA_ERROR | aerr)
                    else:
                        result = 0
                        size = fr.nsect * SECTOR_SIZE
                        if req.op == OP_READ:
                            if n < ATA_HDR_LEN + size:
                                drops["short"] += 1
                                continue
                            req.buf[fr.offset:fr.offset + size] = \
                                view[ATA_HDR_LEN:ATA_HDR_LEN + size]
                        data += size
                    if result:
                        self.stats["errors"] += 1
                    path.recv += 1
                    path.last_recv_us = t
                    answers += 1
                    if sent_us is not None:
                        if sent_us > path.newest_answered_us:
                            path.newest_answered_us = sent_us
                        us = t - sent_us
                        path.rtt_n += 1
                        path.rtt_sum_us += us
                        if us > path.rtt_max_us:
                            path.rtt_max_us = us
                    if back or fr.state == FRAME_PENDING:
                        path.spurious += 1            # given up as lost, yet answered
                        self.stats["resent_spurious"] += 1
                    elif fr.ntx > 1:
                        path.needed += 1
                        self.stats["resent_needed"] += 1
                    self._finish_frame(fr, result, back)
        finally:
            self.stats["frames_recv"] += answers
            self.stats["bytes_data"] += data

    def _older_transmission(self, fr, tag, buf):
        """Which transmission of fr an answer that is not to its latest one names (0: the
        latest, though the frame was given up; 1: the one before; more: older), or None
        when it is dropped (counted)."""
        drops = self.drops
        if bin(tag).count("1") & 1:
            drops["bad_tag"] += 1
            return None
        if fr is None or tag & (TAG_USER | TAG_ENGINE) != TAG_USER | TAG_ENGINE or not fr.ntx:
            drops["stale"] += 1
            return None
        gen = tag >> 16 & GEN_MAX                 # 1..GEN_MAX: 0 would pass for GEN_MAX
        back = (fr.gen - gen) % GEN_MAX
        if not gen or back >= fr.ntx:
            drops["stale"] += 1               # names no transmission of this frame
            return None
        if fr.state == FRAME_DONE:
            path = (fr.path if back == 0 else fr.before_path if back == 1
                    else self._path_to(buf[6:12]))
            if fr.done_back is not None and back > fr.done_back and \
                    path is not None and path.dst == buf[6:12]:
                path.late += 1                # a resend completed it, and this shows it need
                drops["late"] += 1            # not have
            else:
                drops["stale"] += 1
            return None
        return back

    def pump(self, timeout_us, extra_fd=-1):
        """One round: receive what arrived, send, wait up to timeout_us (or until extra_fd
        is readable), receive, send; returns (done, expired), expiry judged only after the
        sockets were read.  Each path's rtt_*, spurious and needed then describe this round;
        failed lists the frames the target failed in it."""
        self._done, self.failed = [], []
        for p in self.paths:
            p.rtt_n = p.rtt_sum_us = p.rtt_max_us = p.spurious = p.needed = p.late = 0
        by_fd = {p.port.fileno(): i for i, p in enumerate(self.paths)}
        self._receive(by_fd)
        self._send_pending()
        if extra_fd >= 0:
            self._poller.register(extra_fd, select.POLLIN)
        try:
            wait = self._inflight or extra_fd >= 0
            self._receive(by_fd, max(0, timeout_us) // 1000 if wait and not self._done else 0)
        finally:
            if extra_fd >= 0:
                self._poller.unregister(extra_fd)
        self._send_pending()
        expired = []
        t = now_us()
        for slot, fr in self._inflight.items():
            if not fr.reported and self._lost(fr, t):
                fr.reported = True
                expired.append(slot)
        return self._done, expired

    @staticmethod
    def _lost(fr, t):
        """Unanswered for rto_us, or for reorder_us once a frame sent after it was answered."""
        age, path = t - fr.sent_us, fr.path
        return age > path.rto_us or (age > path.reorder_us and fr.sent_us < path.newest_answered_us)

    @property
    def answered(self):
        return self.stats["frames_recv"]

    def expired_path(self, slot):
        return self._inflight[slot].path.index

    def resend(self, slot):
        """Send again first, with the slot's next generation; an answer to the transmission
        given up still completes the frame."""
        fr = self._inflight.pop(slot)
        fr.path.outstanding -= 1
        fr.state = FRAME_PENDING
        self._pending.appendleft(fr)

    def fail_all(self, status):
        for fr in self._inflight.values():
            fr.path.outstanding -= 1
        for fr in self._frames.values():
            if fr.state != FRAME_DONE:
                fr.state, fr.done_back, fr.req = FRAME_DONE, None, None
                self._free.append(fr.slot)
        self._inflight.clear()
        self._pending.clear()
        failed = [(req_id, status) for req_id in self._requests]
        self._requests.clear()
        return failed

    def close(self):
        pass


class CompiledEngine:
    """The helper's frame engine (struct aoe_eng), what HelperPump drives and the helper's
    bridges (UblkBridge, NbdBridge) reach it through: its cffi module (ffi, lib), the
    engine itself (eng), and the pins, req_id -> cdata keeping a submitted request's
    buffer alive while the engine may use it (dropped when its completion is read)."""

    def __init__(self, helper, shelf, slot, gen_seed, frames=MAX_FRAMES):
        self.ffi, self.lib = helper.ffi, helper.lib
        eng = self.lib.aoe_eng_new(shelf, slot, frames, gen_seed)
        if eng == self.ffi.NULL:
            raise AoeError("out of memory for the frame engine")
        self.eng = self.ffi.gc(eng, self.lib.aoe_eng_free)
        self.pins = {}

    def set_spin(self, spin_us, lone_spin_us):
        """How long the pump polls before it sleeps (see Engine.spin_for); PyPump never
        spins."""
        self.eng.spin_us, self.eng.lone_spin_us = spin_us, lone_spin_us


class HelperPump:
    """The frame mechanism in C (_aoeio): exactly PyPump's interface, one call per batch.

    Python objects never see single frames here: requests go in whole, and
    completions, expiries and RTT samples come back as arrays per pump().  The
    bridges that feed the same engine from the kernel live with their backends."""

    def __init__(self, compiled, lba48, spf):
        self._compiled = compiled
        eng = self._eng = compiled.eng
        eng.lba48 = 1 if lba48 else 0
        eng.flush_cmd = ATA_CMD_FLUSH_EXT if lba48 else ATA_CMD_FLUSH
        eng.sectors_per_frame = spf
        self.paths = []

    @property
    def flush_cmd(self):
        return self._eng.flush_cmd

    @flush_cmd.setter
    def flush_cmd(self, value):
        self._eng.flush_cmd = value

    def add_path(self, port, dst):
        index = self._compiled.lib.aoe_eng_add_path(self._eng, port.fileno(), port.mac, dst)
        if index < 0:
            raise AoeError("%s: cannot add path: %s" % (port.name, os.strerror(-index)))
        self.paths.append(self._eng.paths[index])   # a view of the C struct: writes go to C
        return index

    @property
    def busy(self):
        return self._eng.active_requests > 0

    @property
    def active_requests(self):
        return self._eng.active_requests

    def submit(self, req_id, op, lba, nsect, buf):
        ffi, pins = self._compiled.ffi, self._compiled.pins
        ptr = ffi.NULL
        if buf is not None:
            ptr = ffi.from_buffer(buf, require_writable=(op == OP_READ))
            pins[req_id] = ptr
        rc = self._compiled.lib.aoe_submit(self._eng, req_id, op, lba, nsect, ptr)
        if rc < 0:
            pins.pop(req_id, None)
        return rc

    def pump(self, timeout_us, extra_fd=-1):
        compiled, eng = self._compiled, self._eng
        rc = compiled.lib.aoe_pump(eng, timeout_us, extra_fd)
        if rc < 0 and rc != -errno.EINTR:
            raise AoeError("frame engine: %s" % os.strerror(-rc))
        done = self._events()
        expired = compiled.ffi.unpack(eng.expired, eng.nexpired) if eng.nexpired else []
        return done, expired

    @property
    def failed(self):
        """The frames the target failed during the last pump, as PyPump.failed; None when
        more failed than the engine lists (then none is known)."""
        eng = self._eng
        if eng.failed_unlisted:
            return None
        return [(f.req_id, f.lba, f.nsect, f.status) for f in eng.failed[0:eng.nfailed]]

    def _events(self):
        """The completions in eng.done, releasing their buffers."""
        eng = self._eng
        done = [(eng.done[i].req_id, eng.done[i].status) for i in range(eng.ndone)]
        for req_id, _ in done:
            self._compiled.pins.pop(req_id, None)
        return done

    @property
    def answered(self):
        return self._eng.c.frames_recv

    def expired_path(self, slot):
        return self._compiled.lib.aoe_frame_path(self._eng, slot)

    def resend(self, slot):
        self._compiled.lib.aoe_resend(self._eng, slot)

    def fail_all(self, status):
        self._compiled.lib.aoe_fail_all(self._eng, status)
        return self._events()

    @property
    def stats(self):
        c = self._eng.c
        return collections.Counter({k: getattr(c, k) for k in PUMP_COUNTERS})

    @property
    def drops(self):
        c = self._eng.c
        return DropCounters({k: getattr(c, "drop_" + k) for k in PUMP_DROPS})

    def close(self):
        self._compiled.pins.clear()


# What aoe.py and the helper must agree on: constants of the same name and value on both sides.
HELPER_CONSTANTS = (
    "ETH_P_AOE", "ETH_ZLEN", "ATA_HDR_LEN", "AOE_HDR_LEN", "AOE_HVER", "AOEFL_RSP", "AOEFL_ERR",
    "AOECMD_ATA", "AOE_SHELF_ANY", "AOE_SLOT_ANY", "ATA_ERR", "ATA_DF", "ATA_DRDY", "ATA_UNC",
    "ATA_IDNF", "ATA_ABORTED", "LBA28_MAX", "SECTOR_SIZE",
    "TAG_USER", "TAG_ENGINE", "GEN_MAX", "MAX_FRAMES", "MAX_PATHS",
    "BRIDGE_ID", "BRIDGE_ID_FIELDS", "NBD_ID", "NBD_ID_FIELDS", "PROBE_REQ",
    "NBD_CMD_READ", "NBD_CMD_WRITE", "NBD_CMD_DISC", "NBD_CMD_FLUSH", "NBD_CMD_FLAG_FUA",
    "STATUS_AOE_ERROR", "STATUS_ATA_ERROR", "OP_READ", "OP_WRITE", "OP_FLUSH",
    "AOEAFL_EXT", "AOEAFL_WRITE", "ATA_CMD_PIO_READ", "ATA_CMD_PIO_READ_EXT",
    "ATA_CMD_PIO_WRITE", "ATA_CMD_PIO_WRITE_EXT", "ATA_CMD_FLUSH", "ATA_CMD_FLUSH_EXT",
)


def helper_mismatch(helper):
    """How a built helper disagrees with this aoe.py (constants, the fields both pumps
    share, the counters read by name), as a list of words; empty when they agree."""
    here = globals()
    problems = ["%s is %s in the helper, %s here" % (name, getattr(helper.lib, name, None),
                                                     here[name])
                for name in HELPER_CONSTANTS if getattr(helper.lib, name, None) != here[name]]
    fields = lambda struct: {f for f, _ in helper.ffi.typeof(struct).fields}
    try:
        path_fields, counters = fields("struct aoe_path"), fields("struct aoe_counters")
    except (helper.ffi.error, KeyError) as e:
        return problems + [str(e)]
    shared = set(PumpPath.__slots__) - {"index", "port", "header", "head"}
    problems += ["struct aoe_path lacks " + f for f in sorted(shared - path_fields)]
    problems += ["struct aoe_path has %s, PumpPath not" % f
                 for f in sorted(path_fields - shared - {"fd"})]
    wanted = set(PUMP_COUNTERS) | {"drop_" + d for d in PUMP_DROPS}
    problems += ["struct aoe_counters lacks " + f for f in sorted(wanted - counters)]
    problems += ["it lacks " + f for f in ("aoe_srv_set_bad", "ublk_queue_start_sector")
                 if not hasattr(helper.lib, f)]
    return problems


_helper_cache = []


def load_helper():
    """The compiled helper module, or None (pure-Python path): AOE_NO_HELPER=1, not built,
    or built from a _aoeio.c that disagrees with this aoe.py (said once, on stderr)."""
    if os.environ.get("AOE_NO_HELPER"):
        return None
    if _helper_cache:
        return _helper_cache[0]
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        import _aoeio as helper
    except ImportError:
        helper = None
    problems = helper_mismatch(helper) if helper is not None else []
    if problems:
        sys.stderr.write("%s: the compiled helper %s does not match this aoe.py (%s): rebuild it "
                         "with 'python3 build_ffi.py'; using the pure-Python path\n"
                         % (PROG, helper.__file__, "; ".join(problems[:3])))
        helper = None
    _helper_cache.append(helper)
    return helper


def need_helper(verb):
    helper = load_helper()
    if helper is None:
        raise AoeError("%s needs the compiled helper: install cffi and a C compiler, then run "
                       "'python3 build_ffi.py' next to aoe.py" % verb)
    return helper


class PathPolicy:
    """One path's window and retransmit timeout, decided once per pump round from
    what the round brought (answers, round trips, expiries, late answers).

    A frame counts as lost when it goes unanswered for the retransmit timeout,
    or, sooner, for a reorder window (a quarter of a round trip at first) once a
    frame sent after it has been answered: a target that answers in order has
    then surely dropped it, and one that reorders shows it by answering resent
    frames after all, which widens the window.

    The window starts at the target's buffer count: on a LAN that count, not
    the link, is the limit, and a frame lost here and there (random loss) is
    resent without shrinking it.  Only when the path falls silent for a whole
    retransmit timeout, or more than a quarter of recent answers (about the
    last 64) came only to resends (the target or a switch overflowing), is the
    window halved and the timeout
    doubled, at most once per timeout; slow start then grows it back to where
    it was cut, and one frame per window of answers after that.  When frames
    given up as lost are answered after all and none of the resends was needed,
    the losses were delays: the cut is undone."""

    __slots__ = ("limit", "window", "ssthresh", "rto_us", "srtt", "rttvar", "credit", "loss",
                 "reorder_factor", "clean_rounds", "last_answer", "expired_since", "next_cut",
                 "before_cut", "needed_since_cut", "cuts", "undone", "retry_at", "times_set_aside")

    def __init__(self, limit, t):
        self.limit = limit
        self.cuts = self.undone = self.times_set_aside = self.retry_at = 0
        self.restart(t, limit)

    def restart(self, t, window):
        """Forget what was learnt: a fresh start at `window` frames."""
        self.window, self.ssthresh = window, self.limit
        self.rto_us, self.srtt, self.rttvar = INITIAL_RTO_US, 0.0, 0.0
        self.credit, self.loss = 0, 0.0
        self.reorder_factor, self.clean_rounds = 1, 0
        self.last_answer, self.expired_since, self.next_cut = t, 0, 0
        self.before_cut, self.needed_since_cut = None, 0

    def round(self, t, answered, samples, rtt_sum_us, rtt_max_us, lost, spurious, needed, late):
        """Take one pump round of this path: `answered` answers, `samples` of them
        with round trips summing to rtt_sum_us (largest rtt_max_us), `lost` frames
        expired, `spurious` answers to transmissions given up as lost, `needed`
        answers to resends whose earlier transmissions had none, `late` answers
        to those earlier transmissions after all."""
        spurious, needed = spurious + late, needed - late
        if spurious:
            self.reorder_factor = min(REORDER_MAX_FACTOR, self.reorder_factor * 2)
            self.clean_rounds = 0
        elif needed:
            self.clean_rounds += 1
            if self.clean_rounds >= REORDER_SHRINK_AFTER:
                self.reorder_factor, self.clean_rounds = max(1, self.reorder_factor // 2), 0
        if self.before_cut is not None:
            self.needed_since_cut += needed
            if spurious and self.needed_since_cut <= 0:
                self.window, self.ssthresh, self.rto_us = self.before_cut
                self.before_cut = None
                self.undone += 1
        if samples:
            self._learn_rtt(rtt_sum_us / samples, rtt_max_us)
        if answered:
            self.last_answer, self.expired_since = t, 0
            # Losses count once confirmed (a resend answered, the transmission before it
            # never): frames given up while the target reorders or jitters, then answered,
            # are delays, not losses.
            keep = (1 - LOSS_WEIGHT) ** answered
            self.loss = self.loss * keep + min(max(needed, 0), answered) / answered * (1 - keep)
        if lost:
            self._lost(t, lost)
        elif answered:
            if self.before_cut is not None and t >= self.next_cut:
                # a timeout went by without sign of a delay: it stands
                self.before_cut = None
            self._grow(answered)

    def _learn_rtt(self, mean, largest):
        """Jacobson/Karels, fed once per round with the round's mean and spread."""
        if self.srtt == 0:
            self.srtt, self.rttvar = mean, mean / 2
        else:
            err = mean - self.srtt
            self.srtt += err / 8
            self.rttvar += (max(abs(err), largest - mean) - self.rttvar) / 4
        self.rto_us = int(min(MAX_RTO_US, max(MIN_RTO_US, self.srtt + 4 * self.rttvar)))

    def _lost(self, t, lost):
        self.expired_since += lost
        silent = t - self.last_answer >= self.rto_us
        if (silent or self.loss > LOSS_CONGESTED) and t >= self.next_cut:
            if self.before_cut is None:
                self.before_cut, self.needed_since_cut = \
                    (self.window, self.ssthresh, self.rto_us), 0
            self.ssthresh = max(1, self.window // 2)
            self.window = self.ssthresh
            self.rto_us = min(MAX_RTO_US, self.rto_us * 2)
            self.next_cut = t + self.rto_us
            self.cuts += 1

    def _grow(self, answered):
        """Slow start below ssthresh, then one more frame per window of answers."""
        if self.window >= self.limit:
            return
        if self.window < self.ssthresh:
            self.window = min(self.ssthresh, self.window + answered)
        else:
            self.credit += answered
            if self.credit >= self.window:
                self.credit = 0
                self.window += 1

    @property
    def reorder_us(self):
        if not self.srtt:
            return self.rto_us
        return int(min(self.rto_us, max(MIN_REORDER_US, self.srtt / 4 * self.reorder_factor)))

    @property
    def silent_for_long(self):
        return self.expired_since >= PATH_LOST_LIMIT


class Engine:
    """Reads, writes and flushes on one target: the policy over a pump.

    A window per path up to the target's buffer count (and --maxout), a
    retransmit timeout from the smoothed RTT (see PathPolicy); every path that
    answers is used, and one that falls silent is set aside while others
    work; after `deadsecs` without any answer every request fails with
    ETIMEDOUT.  `clock` (microseconds) is for tests.

    With the helper, the pump is a HelperPump and `compiled` the CompiledEngine it
    drives (the one way to ask whether this engine runs in C, and how the helper's
    bridges reach it); without, a PyPump and None."""

    def __init__(self, target, deadsecs=DEFAULT_DEADSECS, maxout=DEFAULT_MAXOUT, helper=None,
                 clock=now_us, frames=MAX_FRAMES):
        if target.identify is None:
            raise AoeError("%s: %s" % (target.name, target.identify_error or "not identified"))
        self.target = target
        self.deadsecs = deadsecs
        self.clock = clock
        self.lba48 = target.identify.lba48
        self.sectors = target.identify.sectors
        self.spf = target.sectors_per_frame
        self.window = max(1, min(target.info.bufcnt or 1, maxout))
        seed = random.getrandbits(14)
        if helper is None:
            self.compiled = None
            self.pump = PyPump(target.shelf, target.slot, self.lba48, self.spf, seed, frames)
        else:
            self.compiled = CompiledEngine(helper, target.shelf, target.slot, seed, frames)
            self.pump = HelperPump(self.compiled, self.lba48, self.spf)
        t = clock()
        self.policy = []
        for p in target.paths[:MAX_PATHS]:
            i = self.pump.add_path(p.port, p.mac)
            self.pump.paths[i].maxout = self.window
            self.policy.append(PathPolicy(self.window, t))
        self.path_recv = [0] * len(self.policy)  # each path's answers as of the last poll
        self.last_progress = t
        self.answered = 0
        self.dead = None
        self.next_id = 0
        self.backlog = []                         # completions wait() saw for other requests
        self.failures = {}                        # req_id -> its failed frames (failed_frames)
        self.returned_failed = []                 # requests the last poll returned as failed
        self.patience = (0, 0)                    # be_patient(): floors of the two timeouts

    def submit(self, op, lba, nsect, buf, req_id=None):
        """Queue a request; returns its id.  Raises AoeError for bad ranges or a dead target."""
        if self.dead:
            raise AoeError(self.dead)
        if op != OP_FLUSH and (lba < 0 or nsect <= 0 or lba + nsect > self.sectors):
            raise AoeError("%s: sectors %d-%d are outside the device (%d sectors)"
                           % (self.target.name, lba, lba + nsect - 1, self.sectors))
        if not self.lba48 and op != OP_FLUSH and lba + nsect > LBA28_MAX:
            raise AoeError("%s: sector %d needs LBA48, which the target lacks"
                           % (self.target.name, lba + nsect))
        if req_id is None:
            req_id = self.next_id = self.next_id + 1
        if not self.pump.busy:
            self.last_progress = self.clock()
        rc = self.pump.submit(req_id, op, lba, nsect, buf)
        if rc < 0:
            raise AoeError("%s: cannot queue request: %s" % (self.target.name, os.strerror(-rc)))
        return req_id

    def poll(self, timeout_us=10000, extra_fd=-1):
        """Advance I/O; returns [(req_id, status)] of finished requests (status 0 or -code).
        Waits at most timeout_us, less once extra_fd (e.g. a ublk queue) is readable."""
        idle, started = not self.pump.busy, self.clock()
        done, expired = self.pump.pump(0 if self.backlog else timeout_us, extra_fd)
        # requests the pump took itself (ublk) start the clock now
        if idle:
            self.last_progress = started
        # a request's frames fail over several polls; once it was returned, what was not asked
        # for is gone (but for completions wait() keeps for later)
        kept = {rid for rid, _ in self.backlog}
        for rid in self.returned_failed:
            if rid not in kept:
                self.failures.pop(rid, None)
        failed = self.pump.failed
        for rid, lba, nsect, status in failed or ():
            self.failures.setdefault(rid, []).append((lba, nsect, status))
        if failed is None:                        # more than the engine lists: none is known
            self.failures.clear()
        if self.backlog:
            done, self.backlog = self.backlog + list(done), []
        t = self.clock()
        answered = self.pump.answered
        if answered != self.answered:
            self.answered, self.last_progress = answered, t
        lost = collections.Counter(self.pump.expired_path(slot) for slot in expired)
        for i, (pol, path) in enumerate(zip(self.policy, self.pump.paths)):
            answers, self.path_recv[i] = path.recv - self.path_recv[i], path.recv
            pol.round(t, answers, path.rtt_n, path.rtt_sum_us, path.rtt_max_us, lost[i],
                      path.spurious, path.needed, path.late)
            self._apply(pol, path)
        self._set_aside_silent(t, lost)
        if self.compiled is not None:
            self.compiled.set_spin(*self.spin_for())
        for slot in reversed(expired):            # each goes to the head: keep them in order
            self.pump.resend(slot)
        self._revive_paths(t)
        if self.pump.busy and t - self.last_progress > self.deadsecs * 1000000:
            self.dead = ("%s: no answer for %d s (deadsecs); the target is down or unreachable"
                         % (self.target.name, self.deadsecs))
            done = list(done) + self.pump.fail_all(-errno.ETIMEDOUT)
        self.returned_failed = [rid for rid, status in done if status]
        return done

    def spin_for(self):
        """How long the helper's pump polls before it sleeps, as (while answers are due, while
        a bridge holds at most one request): SPIN_US while some path answers within SPIN_RTT_US
        (a fast target nearby, whose queue would run dry during a sleep and a wake-up);
        LONE_SPIN_RTTS of the fastest path's round trips, at most LONE_SPIN_MAX_US (a request
        at qd1 would otherwise sleep and wake twice: for its answer, then for the next
        request; the cap bounds what a slow target costs).  The pure-Python pump does not
        spin."""
        rtts = [pol.srtt for pol, path in zip(self.policy, self.pump.paths)
                if path.enabled and pol.srtt > 0]
        fastest = min(rtts, default=0)
        return (SPIN_US if 0 < fastest <= SPIN_RTT_US else 0,
                int(min(LONE_SPIN_MAX_US, LONE_SPIN_RTTS * fastest)))

    def _set_aside_silent(self, t, lost):
        """A path whose frames keep expiring unanswered rests while others work."""
        for i in lost:
            pol, path = self.policy[i], self.pump.paths[i]
            others = any(p.enabled for j, p in enumerate(self.pump.paths) if j != i)
            if path.enabled and others and pol.silent_for_long:
                path.enabled = 0
                pol.retry_at = t + PATH_RETRY_US
                pol.times_set_aside += 1

    def revive(self):
        """Forget a dead verdict: the next requests try every path again, one frame at a time."""
        self.dead = None
        t = self.last_progress = self.clock()
        for pol, path in zip(self.policy, self.pump.paths):
            pol.restart(t, 1)
            path.enabled = 1
            self._apply(pol, path)

    def _revive_paths(self, t):
        for pol, path in zip(self.policy, self.pump.paths):
            if not path.enabled and t >= pol.retry_at:
                pol.restart(t, 1)
                pol.expired_since = PATH_LOST_LIMIT - 1
                path.enabled = 1
                self._apply(pol, path)

    def be_patient(self, silent_us, reordered_us=0):
        """Slow answers are expected (a failing disk retrying a sector): a frame is sent again
        only after `silent_us` unanswered while nothing newer is answered either, or after
        `reordered_us` once newer frames were.  Sending sooner would only queue the same slow
        read at the target again: a single-threaded one works through every copy in turn.
        (0, 0): the policy's timeouts alone."""
        self.patience = (silent_us, reordered_us)
        for pol, path in zip(self.policy, self.pump.paths):
            self._apply(pol, path)

    def _apply(self, pol, path):
        """What the policy decided, within the patience asked for, into the pump's view of
        the path."""
        path.maxout = pol.window
        path.rto_us = max(pol.rto_us, self.patience[0])
        path.reorder_us = max(pol.reorder_us, self.patience[1])

    def failed_frames(self, req_id):
        """The frames of a request the last poll() returned as failed that the target failed
        itself, as [(lba, count, status)] sorted: the rest of it was done.  Empty when nothing
        was answered for it (a dead target) or more frames failed in one poll than the engine
        lists: then none of it counts as done."""
        return sorted(self.failures.pop(req_id, ()))

    def fall_back_flush(self, status):
        """After a failed flush: True if the target aborted FLUSH CACHE EXT (vblade does), in
        which case FLUSH CACHE is used from now on and the flush should be sent again."""
        if status != -(STATUS_ATA_ERROR | ATA_ABORTED) or self.pump.flush_cmd != ATA_CMD_FLUSH_EXT:
            return False
        self.pump.flush_cmd = ATA_CMD_FLUSH
        return True

    def flush(self):
        """Empty the target's write cache."""
        status = self.wait(self.submit(OP_FLUSH, 0, 0, None))
        if status and self.fall_back_flush(status):
            status = self.wait(self.submit(OP_FLUSH, 0, 0, None))
        if status:
            raise AoeError(self.error_text(OP_FLUSH, 0, 0, status))

    def wait(self, req):
        """Poll until request `req` finishes; returns its status.  Other requests'
        completions wait for the next poll()."""
        while True:
            found = None
            for rid, status in self.poll(20000):
                if rid == req:
                    found = status
                else:
                    self.backlog.append((rid, status))
            if found is not None:
                return found

    def run(self, op, lba, nsect, buf):
        """Do one request to completion."""
        status = self.wait(self.submit(op, lba, nsect, buf))
        if status:
            raise AoeError(self.error_text(op, lba, nsect, status))

    def error_text(self, op, lba, n, status):
        """What went wrong with a request, in words."""
        name = self.target.name
        if self.dead:
            return self.dead
        if op == OP_WRITE and status == -(STATUS_ATA_ERROR | ATA_ABORTED):
            return ("%s refused the write at sector %d (ATA command aborted): the target is "
                    "probably exported read-only" % (name, lba))
        return "%s: %s %d sectors at %d failed: %s" % (name, ("read", "write", "flush")[op], n, lba,
                                                       status_text(status))

    def describe(self):
        """Per-path and engine counters, for -v: every resend explained, every drop counted."""
        lines = []
        for path, p, pol in zip(self.target.paths, self.pump.paths, self.policy):
            lines.append("path %s: sent %d, answered %d, window %d of %d, %d frames in flight, "
                         "rto %.1f ms, srtt %.2f ms; window cut %d times (%d undone)%s%s\n"
                         % (path, p.sent, p.recv, p.maxout, pol.limit, p.outstanding,
                            p.rto_us / 1000.0, pol.srtt / 1000.0, pol.cuts, pol.undone,
                            "" if p.enabled else ", set aside now",
                            ", set aside %d times" % pol.times_set_aside if pol.times_set_aside
                            else ""))
        s = self.pump.stats
        late = self.pump.drops["late"]
        in_place = (" (%d read answers received straight into their buffer)" % s["frames_in_place"]
                    if s["frames_in_place"] else "")
        lines.append("frames: sent %d, answered %d%s, resent %d: %d lost (the resend was answered, "
                     "the earlier transmission never), %d late (the resend was answered first, the "
                     "earlier one after), %d spurious (the earlier one was answered first), "
                     "the rest unanswered\n"
                     % (s["frames_sent"], s["frames_recv"], in_place, s["frames_resent"],
                        s["resent_needed"] - late, late, s["resent_spurious"]))
        lines.append("dropped: %s\n" % self.pump.drops.describe())
        return "".join(lines)

    def close(self):
        self.pump.close()


# =============================================================================
# Block backends: a target as a block device, through ublk or NBD
# =============================================================================
#
# Each attached device has an AttachDaemon (a thread of the attach process,
# DeviceHost) that owns its engine and one backend, the kernel driver that
# makes the block device:
#
#   UblkBackend  /dev/ublkbN (Linux 6.5+, the compiled helper): the helper's
#                pump takes requests from the ublk queue and commits those
#                that go well itself; Python sees only failures and requests
#                handed over.
#   NbdBackend   /dev/nbdN (every kernel with the nbd module; standard library
#                only): the daemon serves the NBD transmission protocol on a
#                socketpair whose other end the kernel holds; with the helper
#                its pump serves it as it serves a ublk queue (NbdBridged),
#                else Python does (NbdStream).
#
# Both keep one contract, BlockBackend, and ask the daemon only what a
# BackendHost offers, so the daemon, its record RUN_DIR/eX.Y.json (where stat,
# detach, flush and attach --recover find it), its log RUN_DIR/eX.Y.log and the
# links /dev/etherd/eX.Y behave the same for both.

# eX.Y -> the block device, named as the kernel driver does
DEFAULT_LINK_DIR = "/dev/etherd"
LINK_DIR = os.environ.get("AOE_LINK_DIR", DEFAULT_LINK_DIR)
MIN_REQUEST = 128                 # sectors: smallest largest-request we advertise (64 KiB)
MAX_REQUEST = 1024                # sectors: 512 KiB, the default largest ublk buffer
UBLK_MIN_DEPTH = 32               # tags: enough for random I/O at queue depth 32
UBLK_MAX_DEPTH = 128
UBLK_NEEDED = UBLK_F_CMD_IOCTL_ENCODE
UBLK_RECOVERY = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE
# what aoe.py asks ADD_DEV for where the kernel has it, as stat --json names it
UBLK_FEATURES = (
    (UBLK_RECOVERY, "user-recovery"),         # attach --recover after the daemon died (6.1)
    (UBLK_F_UPDATE_SIZE, "update-size"),      # revalidate resizes the live device (6.16)
    # attach --upgrade hands the device to a new daemon (6.16)
    (UBLK_F_QUIESCE, "quiesce"),
)
# what the helper asks of the queue's io_uring where the kernel has it, named likewise
RING_FEATURES = (
    # a request reaching a running daemon waits for its next system call (5.19)
    (IORING_SETUP_COOP_TASKRUN, "coop-taskrun"),
)
QUIESCE_TIMEOUT_MS = 10000        # how long QUIESCE_DEV may wait for a tag the daemon is not using
PROBE_INTERVAL = 1.0              # seconds between probes of a down target
PROBE_DEADSECS = 2                # a probe fails after this long without an answer
DETACH_DEADSECS = 5               # while detaching, give up on a silent target after this long
CONTROL_LIMIT = 60                # seconds a control command may take beyond deadsecs
QUIESCE_WAIT = 30                 # seconds to wait for the kernel to notice a dead daemon
BACKENDS = ("ublk", "nbd")
# An attached device's state in its record, besides STATE_UP (AttachDaemon draws the
# transitions); STATE_DEAD is never recorded: a record whose daemon is gone reads so.
STATE_DOWN = "down"               # the target silent for deadsecs: I/O fails, probed
STATE_RECOVERING = "recovering"   # a new daemon takes the device over
STATE_HANDING_OVER = "handing-over"   # pausing the device for a new daemon
STATE_HANDED_OVER = "handed-over"     # paused, left for the new daemon
STATE_DEAD = "dead"               # its daemon gone: attach --recover or detach


class BackendHost:
    """What a backend may ask of the daemon serving its device, and nothing more: the
    target and the engine that reaches it, the device's log, whether the device is
    read-only and whether the target is up (the daemon keeps both current), and three
    calls: record(backend, state, recoverable) the device once made, serve(timeout_us) one
    round of the daemon's loop (False once the kernel let go), and serve_while(call) a
    control command the kernel completes only after I/O through the device."""

    def __init__(self, target, engine, log, readonly, record, serve, serve_while):
        self.target, self.engine, self.log = target, engine, log
        self.readonly = readonly
        self.up = True
        self.record, self.serve, self.serve_while = record, serve, serve_while


class BlockBackend(abc.ABC):
    """A kernel driver that makes a block device of a target: every member the daemon and
    the commands use, each with its contract.  Made with its device's BackendHost and
    the helper (or None).  It sends the device's requests through host.engine with ids of
    its own choosing and gets each back through completed(); dev_id is the kernel's number
    for the device (None until it is made)."""

    name = None                                   # in records and after --backend

    @staticmethod
    @abc.abstractmethod
    def missing(helper):
        """Why this backend cannot attach here, or None."""

    @staticmethod
    @abc.abstractmethod
    def frames_needed(target):
        """The engine's frame slots for the largest requests the kernel may send at once."""

    @staticmethod
    @abc.abstractmethod
    def remove_orphan(attachment):
        """Remove a recorded device whose daemon is gone; an error text or None."""

    @property
    @abc.abstractmethod
    def dev(self):
        """The block device's name under /dev."""

    @property
    @abc.abstractmethod
    def features(self):
        """The optional kernel features the device uses, as stat --json names them."""

    @abc.abstractmethod
    def create(self):
        """Make the device and host.record it up; the kernel may already be using it."""

    @abc.abstractmethod
    def recover(self, attachment):
        """Serve the recorded device again (its daemon died, or handed it over) and
        host.record it."""

    @abc.abstractmethod
    def resize(self, sectors):
        """Give the live device the target's new size, or raise AoeError saying why not."""

    @abc.abstractmethod
    def hand_over(self):
        """Pause the device for a new daemon, its requests kept, or raise AoeError."""

    @abc.abstractmethod
    def wait_fd(self):
        """The descriptor that becomes readable when the kernel has requests (-1: none
        wanted now), for the engine's poll."""

    @abc.abstractmethod
    def intake(self):
        """The kernel's new requests into the engine, answers out; False once the kernel
        has let go of the device."""

    @abc.abstractmethod
    def completed(self, rid, status):
        """The engine request `rid` of this backend ended (status 0 or negative)."""

    @abc.abstractmethod
    def set_down(self, down):
        """The target fell silent (True) or answers again: meanwhile requests fail at once."""

    @abc.abstractmethod
    def report(self):
        """A few words on the requests it holds, for the log."""

    @abc.abstractmethod
    def stop(self):
        """Stop the device cleanly: the kernel writes back through it (host.serve) first."""

    @abc.abstractmethod
    def close(self):
        """Let go of what it holds; a device not stopped stays for attach --recover."""


def request_layout(target):
    """(largest request in sectors, requests in flight) for a target: a request is one
    full window of frames (buffer count x sectors per frame, within 64-512 KiB), and
    there are tags for four such windows, at least 32 and at most 128."""
    window = max(1, target.info.bufcnt) * target.sectors_per_frame
    request = max(MIN_REQUEST, min(MAX_REQUEST, window))
    depth = max(UBLK_MIN_DEPTH, min(UBLK_MAX_DEPTH, 4 * window // request))
    return request, depth


class Attachment:
    """What RUN_DIR/eX.Y.json records about an attached device."""

    FIELDS = ("device", "backend", "dev", "dev_id", "pid", "state", "sectors", "readonly",
              "recoverable", "log", "features")

    def __init__(self, **fields):
        for k in self.FIELDS:
            setattr(self, k, fields.get(k))
        if self.backend is None and self.dev_id is not None:    # recorded before there was a choice
            self.backend, self.dev = "ublk", "ublkb%d" % self.dev_id

    @staticmethod
    def file(device):
        return os.path.join(RUN_DIR, device + ".json")

    @classmethod
    def load(cls, device):
        try:
            with open(cls.file(device)) as f:
                return cls(**json.load(f))
        except (OSError, ValueError, TypeError):
            return None

    @classmethod
    def all(cls):
        try:
            names = sorted(n[:-5] for n in os.listdir(RUN_DIR) if n.endswith(".json"))
        except OSError:
            return []
        return [a for a in map(cls.load, names) if a is not None]

    @classmethod
    def find(cls, name):
        """The attachment named by eX.Y, its block device or /dev/etherd/eX.Y, or None."""
        path = os.path.realpath(name) if name.startswith("/") else None
        for a in cls.all():
            if name == a.device or path == a.block:
                return a
        return None

    def save(self):
        write_file(self.file(self.device), json.dumps({k: getattr(self, k) for k in self.FIELDS}))

    def remove(self):
        try:
            os.unlink(self.file(self.device))
        except FileNotFoundError:
            pass

    @property
    def block(self):
        return "/dev/" + self.dev

    @property
    def exists(self):
        """Whether the kernel still has the device (nbd's devices exist unconfigured too)."""
        return os.path.exists("/sys/block/" + self.dev + ("/pid" if self.backend == "nbd" else ""))

    @property
    def daemon_alive(self):
        try:
            with open("/proc/%d/cmdline" % self.pid, "rb") as f:
                return b"attach" in f.read()
        except (OSError, TypeError):
            return False

    @property
    def status(self):
        """The recorded state, or STATE_DEAD once its daemon is gone."""
        return self.state if self.daemon_alive else STATE_DEAD

    def as_dict(self):
        d = {k: getattr(self, k) for k in self.FIELDS}
        d.update(block_device=self.block, state=self.status)
        return d


def device_in_use(path, serving_pid=None):
    """Why the block device (or one of its partitions) is busy, or None: mounted or held
    exclusively, or open in some process other than the one serving it."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_EXCL))
    except OSError as e:
        if e.errno == errno.EBUSY:
            return "mounted or held exclusively"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if pid == str(serving_pid):
            continue
        fd_dir = "/proc/%s/fd" % pid
        try:
            for fd in os.listdir(fd_dir):
                dest = os.readlink(os.path.join(fd_dir, fd))
                if dest == path or dest.startswith(path + "p"):
                    with open("/proc/%s/comm" % pid) as f:
                        return "open in pid %s (%s)" % (pid, f.read().strip())
        except OSError:
            continue
    return None


def log_path(device):
    return os.path.join(RUN_DIR, device + ".log")


def refresh_links(device, dev):
    """/dev/etherd/eX.Y -> /dev/DEV, and eX.YpK -> /dev/DEVpK for each partition;
    returns a problem to report, or None."""
    want = {device: dev}
    try:
        for entry in os.listdir("/sys/block/" + dev):
            if entry.startswith(dev + "p"):
                want[device + entry[len(dev):]] = entry
    except OSError:
        pass
    problem = None
    os.makedirs(LINK_DIR, exist_ok=True)
    for name, node in want.items():
        link, dest = os.path.join(LINK_DIR, name), "/dev/" + node
        try:
            if os.readlink(link) == dest:
                continue
        except FileNotFoundError:
            pass
        except OSError:                           # not a link: the kernel driver's own node
            problem = ("%s exists and is not aoe.py's link (kernel aoe driver loaded?); use %s"
                       % (link, dest))
            continue
        tmp = link + ".aoe-new"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(dest, tmp)
        os.replace(tmp, link)
    remove_links(device, dev, keep=set(want))
    return problem


def remove_links(device, dev, keep=()):
    """Remove /dev/etherd links of `device` that point at /dev/DEV or its partitions."""
    target = "/dev/" + dev
    try:
        names = os.listdir(LINK_DIR)
    except OSError:
        return
    for name in names:
        if name in keep or not (name == device or name.startswith(device + "p")):
            continue
        link = os.path.join(LINK_DIR, name)
        try:
            dest = os.readlink(link)
        except OSError:
            continue
        if dest == target or dest.startswith(target + "p"):
            os.unlink(link)


def open_in_thread(path, what, log):
    """Open and close a new block device from another thread, so the kernel reads its
    partition table through the queue this thread serves meanwhile."""
    def scan():
        try:
            os.close(os.open(path, os.O_RDONLY))
        except OSError as e:
            log("%s: %s: %s" % (what, path, e.strerror))
    threading.Thread(target=scan, name="partition-scan", daemon=True).start()


# --- the helper's bridges -----------------------------------------------------
#
# With the helper, the engine's pump takes the kernel's requests itself (from a
# ublk queue or the nbd socket), submits them to the engine and answers those
# that go well; Python sees only failures and the requests the bridge hands
# over.  A bridge object is the backend's handle on its half of the helper
# (Engine.compiled) and owns the request ids the two sides share, laid out as in
# the helper's "Request ids" (a test holds the two equal):
#   BRIDGE_ID | op << 16 | tag   a ublk request the bridge took (op UBLK_IO_OP_*)
#   NBD_ID | op << 32 | slot     a request of the nbd bridge, submitted by it or here (op OP_*)
#   PROBE_REQ                    the daemon's liveness probe
#   anything else (below 2^32)   the backend's own

BRIDGE_ID = 1 << 62
BRIDGE_ID_FIELDS = 0xFFFFFF      # op and tag
NBD_ID = 1 << 61
NBD_ID_FIELDS = 0xFFFFFFFFFF     # op and slot
PROBE_REQ = 1 << 40


class HelperBridge:
    """What both bridges share: the CompiledEngine whose pump they feed, admission, and
    what the last pump left for Python."""

    def __init__(self, compiled):
        self._compiled = compiled

    def admit(self, on):
        """Whether the bridge submits requests itself (off: every one is handed over)."""
        self._compiled.eng.bridge_on = 1 if on else 0

    def _events(self, handed):
        """(the kernel's side is finished, its last error or 0, the requests handed over)."""
        eng = self._compiled.eng
        error, eng.bridge_error = eng.bridge_error, 0
        return bool(eng.bridge_finished), error, [handed[i] for i in range(eng.nhanded)]


class UblkBridge(HelperBridge):
    """The helper's ublk bridge: the pump takes a ublk queue's requests itself, submits
    them under request_id(op, tag) and commits those that succeed; failures come back
    among the engine's completions, and the requests it does not take (admission off,
    other ops, out of range) through events()."""

    @staticmethod
    def request_id(op, tag):
        """The engine id of ublk request `tag` (op UBLK_IO_OP_*) the bridge took."""
        return BRIDGE_ID | (op & 0xFF) << 16 | tag & 0xFFFF

    @staticmethod
    def request_of(rid):
        """(op, tag) of an id request_id made; None for any other id."""
        if rid & ~BRIDGE_ID_FIELDS != BRIDGE_ID:
            return None
        return rid >> 16 & 0xFF, rid & 0xFFFF

    def open(self, queue, sectors, readonly):
        """Bridge the ublk queue `queue` of a device of `sectors` sectors; 0 or -errno."""
        return self._compiled.lib.aoe_eng_bridge(self._compiled.eng, queue, sectors,
                                                 1 if readonly else 0)

    def close(self):
        """End the bridge, before its queue is closed."""
        self._compiled.lib.aoe_eng_bridge(self._compiled.eng, self._compiled.ffi.NULL, 0, 0)

    def resize(self, sectors):
        """The device's new size: requests past it are handed over (and fail)."""
        self._compiled.eng.bridge_sectors = sectors

    def events(self):
        return self._events(self._compiled.eng.ublk_handed)


class NbdBridge(HelperBridge):
    """The helper's nbd bridge: the pump reads the kernel's requests from the nbd socket
    itself, submits them under request_id(op, slot) and answers those that succeed;
    failures come back among the engine's completions, and the requests it does not take
    through events(); both are answered with reply() or submitted under the same id."""

    @staticmethod
    def request_id(op, slot):
        """The engine id of the request in slot `slot` of the bridge (op OP_*)."""
        return NBD_ID | (op & 0xFF) << 32 | slot & 0xFFFFFFFF

    @staticmethod
    def request_of(rid):
        """(op, slot) of an id request_id made; None for any other id."""
        if rid & ~NBD_ID_FIELDS != NBD_ID:
            return None
        return rid >> 32 & 0xFF, rid & 0xFFFFFFFF

    def open(self, sock, slots, buf_size, sectors, readonly):
        """Serve the non-blocking stream socket `sock` with `slots` requests at once."""
        rc = self._compiled.lib.aoe_nbd_bridge(self._compiled.eng, sock.fileno(), slots,
                                               buf_size, sectors, 1 if readonly else 0)
        if rc < 0:
            raise AoeError("nbd bridge: %s" % os.strerror(-rc))

    def close(self):
        """End the bridge (before its socket closes): what the engine holds for it fails,
        and the slots' buffers go, so their pins go too."""
        compiled = self._compiled
        compiled.lib.aoe_nbd_bridge(compiled.eng, -1, 0, 0, 0, 0)
        for rid in [rid for rid in compiled.pins if self.request_of(rid) is not None]:
            del compiled.pins[rid]

    def events(self):
        return self._events(self._compiled.eng.nbd_handed)

    def buffer(self, slot, length):
        """Slot `slot`'s buffer, for a request handed over that is submitted here."""
        return self._compiled.ffi.buffer(self._compiled.lib.aoe_nbd_buf(self._compiled.eng, slot),
                                         length)

    def reply(self, slot, error):
        """Answer a request handed over or failed (error: 0 or an errno)."""
        if self._compiled.lib.aoe_nbd_reply(self._compiled.eng, slot, error) < 0:
            raise AoeError("nbd bridge: slot %d is not waiting for an answer" % slot)

    @property
    def open_requests(self):
        """The requests the bridge holds (read and not yet answered)."""
        return self._compiled.eng.nbd_open


# --- ublk ---------------------------------------------------------------------

def ublk_check(ret, what):
    if ret < 0:
        raise AoeError("%s: %s" % (what, os.strerror(-ret)))
    return ret


class UblkControl:
    """/dev/ublk-control, with the kernel's features checked."""

    def __init__(self, helper):
        self.ffi, self.lib = helper.ffi, helper.lib
        if not os.path.exists("/dev/ublk-control"):
            raise AoeError("no /dev/ublk-control: load the driver with 'modprobe ublk_drv' "
                           "(Linux 6.0 or later, CONFIG_BLK_DEV_UBLK)")
        out = self.ffi.new("struct ublk_ctrl **")
        ret = self.lib.ublk_ctrl_open(out)
        if ret in (-errno.EACCES, -errno.EPERM):
            raise AoeError("/dev/ublk-control: %s; attaching needs root" % os.strerror(-ret),
                           EXIT_USAGE)
        ublk_check(ret, "/dev/ublk-control")
        self.ctrl = out[0]
        features = self.ffi.new("uint64_t *")
        ret = self.lib.ublk_ctrl_get_features(self.ctrl, features)
        if ret < 0:
            self.close()
            raise AoeError("this kernel's ublk cannot report its features (GET_FEATURES: %s); "
                           "aoe.py needs Linux 6.5 or later" % os.strerror(-ret))
        self.features = features[0]
        if self.features & UBLK_NEEDED != UBLK_NEEDED:
            self.close()
            raise AoeError("this kernel's ublk lacks ioctl-encoded commands (features %#x)"
                           % self.features)

    @property
    def can_recover(self):
        return self.features & UBLK_RECOVERY == UBLK_RECOVERY

    def device_flags(self):
        """The UBLK_F_* of UBLK_FEATURES this kernel has (QUIESCE only with recovery)."""
        flags = 0
        for flag, _ in UBLK_FEATURES:
            if self.features & flag == flag and (flag != UBLK_F_QUIESCE or self.can_recover):
                flags |= flag
        return flags

    def info(self, dev_id):
        info = self.ffi.new("struct ublksrv_ctrl_dev_info *")
        ret = self.lib.ublk_ctrl_get_dev_info(self.ctrl, dev_id, info)
        return info if ret == 0 else None

    def command(self, nr, dev_id, data0=0):
        """A control command that needs no queue served while it runs; returns 0 or -errno."""
        return self.lib.ublk_ctrl_cmd(self.ctrl, nr, dev_id, data0)

    def remove(self, dev_id):
        """STOP_DEV + DEL_DEV of a device nobody serves (its daemon is gone)."""
        ret = self.command(UBLK_CMD_STOP_DEV, dev_id)
        if ret < 0 and ret != -errno.ENOENT:
            return ret
        ret = self.command(UBLK_CMD_DEL_DEV, dev_id)
        return 0 if ret == -errno.ENOENT else ret

    def close(self):
        if self.ctrl is not None:
            self.lib.ublk_ctrl_close(self.ctrl)
            self.ctrl = None


class UblkBackend(BlockBackend):
    """/dev/ublkbN.  One queue, served by the daemon's one thread (the kernel binds a
    queue to the task that fetched it): the helper's pump takes each request the
    kernel hands out onto that tag's buffer and commits it when it went well;
    failures and requests the pump hands over come here."""

    name = "ublk"

    def __init__(self, host, helper):
        self.host, self.engine, self.log = host, host.engine, host.log
        self.ffi, self.lib = helper.ffi, helper.lib
        self.bridge = UblkBridge(host.engine.compiled)
        self.max_sectors, self.depth = request_layout(host.target)
        self.control = UblkControl(helper)
        self.dev_id = None
        self.queue = None
        self.inflight = {}                        # tag -> (ublk op, bytes on success, start)
        self.results = []                         # (tag, result) to commit
        self.flags = 0                            # the device's UBLK_F_* of UBLK_FEATURES
        self.ring_flags = 0                       # the queue ring's IORING_SETUP_* (once open)

    @property
    def features(self):
        return ([name for flag, name in UBLK_FEATURES if self.flags & flag == flag] +
                [name for flag, name in RING_FEATURES if self.ring_flags & flag])

    def lacking(self):
        return ([name for flag, name in UBLK_FEATURES if self.control.features & flag != flag] +
                [name for flag, name in RING_FEATURES
                 if self.queue is not None and not self.ring_flags & flag])

    @staticmethod
    def frames_needed(target):
        """Tag slots for every tag's largest request at once, twice over (free slots rest a
        while, so that late answers are recognised); the kernel keeps to max_sectors."""
        request, depth = request_layout(target)
        return min(MAX_FRAMES, 2 * depth * -(-request // target.sectors_per_frame) + 64)

    @staticmethod
    def missing(helper):
        """Why ublk cannot attach here, or None.  Loads ublk_drv if it is a module."""
        if helper is None:
            return "the compiled helper is not built (python3 build_ffi.py)"
        if not os.path.exists("/dev/ublk-control") and shutil.which("modprobe"):
            subprocess.run(["modprobe", "-q", "ublk_drv"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        if not os.path.exists("/dev/ublk-control"):
            return "this kernel has no ublk driver (/dev/ublk-control)"
        try:
            UblkControl(helper).close()
        except AoeError as e:
            return str(e)
        return None

    def create(self):
        """ADD_DEV, SET_PARAMS, open and fetch the queue, START_DEV; returns the disk's name."""
        flags = self.flags = self.control.device_flags()
        self.dev_id = ublk_check(self.lib.ublk_ctrl_add_dev(self.control.ctrl, -1, 1, self.depth,
                                                            self.max_sectors * SECTOR_SIZE, flags),
                                 "ublk ADD_DEV")
        target = self.host.target
        try:
            attrs = UBLK_ATTR_VOLATILE_CACHE | (UBLK_ATTR_READ_ONLY if self.host.readonly else 0)
            params = self.ffi.new("struct ublk_dev_params *", dict(
                dev_sectors=self.engine.sectors, attrs=attrs, logical_bs_shift=9,
                physical_bs_shift=9, io_min_shift=9,
                io_opt_shift=max(9, (target.sectors_per_frame * SECTOR_SIZE).bit_length() - 1),
                max_sectors=self.max_sectors))
            ublk_check(self.lib.ublk_ctrl_set_params(self.control.ctrl, self.dev_id, params),
                       "ublk SET_PARAMS")
            self._open_queue()
            self.host.record(self, STATE_UP, flags & UBLK_RECOVERY != 0)
            self._control_served(UBLK_CMD_START_DEV, os.getpid(), "ublk START_DEV")
        except BaseException:
            self._close_queue()
            self.control.remove(self.dev_id)
            raise
        self.log("attached %s as %s through ublk: %d sectors%s, requests up to %d "
                 "KiB, queue depth %d; %s"
                 % (target.name, "/dev/" + self.dev, self.engine.sectors,
                    " read-only" if self.host.readonly
                    else "", self.max_sectors // 2, self.depth, ublk_features_text(self)))

    @property
    def dev(self):
        return "ublkb%d" % self.dev_id

    def recover(self, attachment):
        """Serve an existing device again after its daemon died (ublk user recovery)."""
        self.dev_id = attachment.dev_id
        deadline = time.monotonic() + QUIESCE_WAIT
        while True:
            info = self.control.info(self.dev_id)
            if info is None:
                raise AoeError("%s: %s no longer exists; attach it again without --recover"
                               % (attachment.device, attachment.block))
            if info.state == UBLK_S_DEV_QUIESCED:
                break
            if info.state == UBLK_S_DEV_LIVE and attachment.daemon_alive:
                raise AoeError("%s is served by pid %d: nothing to recover"
                               % (attachment.device, attachment.pid))
            if time.monotonic() > deadline:
                raise AoeError("%s: %s did not become ready for recovery (state %d) within %d s"
                               % (attachment.device, attachment.block, info.state, QUIESCE_WAIT))
            time.sleep(0.2)
        self.flags = info.flags & sum(flag for flag, _ in UBLK_FEATURES)
        ublk_check(self.control.command(UBLK_CMD_START_USER_RECOVERY, self.dev_id),
                   "ublk START_USER_RECOVERY")
        self._open_queue()
        self.host.record(self, STATE_RECOVERING, True)
        self._control_served(UBLK_CMD_END_USER_RECOVERY, os.getpid(), "ublk END_USER_RECOVERY")

    def resize(self, sectors):
        """The target's new size onto the live device (UPDATE_SIZE): the bridge's and the
        engine's bounds first when it shrinks, last when it grows."""
        if not self.flags & UBLK_F_UPDATE_SIZE:
            raise AoeError("%s cannot change size while attached: %s; detach and attach again"
                           % ("/dev/" + self.dev,
                              "this kernel's ublk has no UPDATE_SIZE (Linux 6.16 or later)"
                              if self.control.features & UBLK_F_UPDATE_SIZE != UBLK_F_UPDATE_SIZE
                              else "it was attached without UPDATE_SIZE"))
        if sectors < self.engine.sectors:
            self._set_bounds(sectors)
        ublk_check(self.control.command(UBLK_CMD_UPDATE_SIZE, self.dev_id, sectors),
                   "ublk UPDATE_SIZE")
        self._set_bounds(sectors)

    def _set_bounds(self, sectors):
        self.engine.sectors = sectors
        self.bridge.resize(sectors)

    def hand_over(self):
        """Pause the device for a new daemon (QUIESCE_DEV: the kernel stops handing out
        requests and ends the queue; those this daemon still holds go to the next one)."""
        if not self.flags & UBLK_F_QUIESCE:
            raise AoeError("%s cannot be handed over: %s"
                           % ("/dev/" + self.dev,
                              "this kernel's ublk has no QUIESCE (Linux 6.16 or later)"
                              if not self.control.device_flags() & UBLK_F_QUIESCE
                              else "it was attached without QUIESCE"))
        self.host.serve_while(lambda: ublk_check(
            self.control.command(UBLK_CMD_QUIESCE_DEV, self.dev_id, QUIESCE_TIMEOUT_MS),
            "ublk QUIESCE_DEV"))

    @staticmethod
    def remove_orphan(attachment):
        """Stop and delete a device whose daemon is gone; an error text or None."""
        control = UblkControl(need_helper("detach"))
        try:
            ret = control.remove(attachment.dev_id)
        finally:
            control.close()
        return "removing %s: %s" % (attachment.block, os.strerror(-ret)) if ret < 0 else None

    def _open_queue(self):
        out = self.ffi.new("struct ublk_queue **")
        buf_bytes = self.max_sectors * SECTOR_SIZE
        for _ in range(250):                      # /dev/ublkcN appears shortly after ADD_DEV
            ret = self.lib.ublk_queue_open(out, self.dev_id, 0, self.depth, buf_bytes)
            if ret != -errno.ENOENT:
                break
            time.sleep(0.02)
        ublk_check(ret, "/dev/ublkc%d" % self.dev_id)
        self.queue = out[0]
        self.ring_fd = self.lib.ublk_queue_ring_fd(self.queue)
        self.ring_flags = self.lib.ublk_queue_ring_flags(self.queue)
        bufs = self.ffi.cast("char *", self.lib.ublk_queue_bufs(self.queue))
        size = self.lib.ublk_queue_buf_size(self.queue)
        self.tag_buf = [bufs + t * size for t in range(self.depth)]
        self.commit_tags = self.ffi.new("uint16_t[]", self.depth)
        self.commit_results = self.ffi.new("int32_t[]", self.depth)
        ublk_check(self.lib.ublk_queue_fetch_all(self.queue), "ublk FETCH_REQ")
        ublk_check(self.bridge.open(self.queue, self.engine.sectors, self.host.readonly),
                   "bridge")

    def _control_served(self, nr, data0, what):
        """Run a control command that needs the queue served meanwhile (START_DEV reads
        the partition table through it; END_USER_RECOVERY and STOP_DEV wait for it)."""
        ublk_check(self.lib.ublk_ctrl_submit(self.control.ctrl, nr, self.dev_id, data0), what)
        result = self.ffi.new("int *")
        limit = time.monotonic() + self.engine.deadsecs + CONTROL_LIMIT
        queue_open = True
        while True:
            ret = self.lib.ublk_ctrl_wait(self.control.ctrl, 0 if queue_open else 100000, result)
            if ret > 0:
                return ublk_check(result[0], what)
            if ret < 0 and ret != -errno.EINTR:
                ublk_check(ret, what)
            if time.monotonic() > limit:
                raise AoeError("%s did not finish in %d s"
                               % (what, self.engine.deadsecs + CONTROL_LIMIT))
            if queue_open:                        # STOP_DEV ends the queue before it returns
                queue_open = self.host.serve(10000)

    def _close_queue(self):
        if self.queue is not None:
            self.bridge.close()
            self.lib.ublk_queue_close(self.queue)
            self.queue = None

    def wait_fd(self):
        return self.ring_fd

    def set_down(self, down):
        """While the target is down the pump hands every request over, and they fail here."""
        self.bridge.admit(not down)

    def completed(self, rid, status):
        """An engine request ended: the answer for its ublk tag, or a flush sent again."""
        bridged = UblkBridge.request_of(rid)
        if bridged is not None:                   # only failures come back from the helper
            (op, tag), nbytes = bridged, 0
            start = self.lib.ublk_queue_start_sector(self.queue, tag)
        else:
            tag = rid
            op, nbytes, start = self.inflight.pop(tag)
        if status and op == UBLK_IO_OP_FLUSH and self.engine.fall_back_flush(status):
            self.inflight[tag] = (op, 0, 0)
            self.engine.submit(OP_FLUSH, 0, 0, None, req_id=tag)
            return
        result = self._failed_result(rid, op, start) if status else nbytes
        if status and not self.engine.dead:
            self.log("%s: %s%s" % (self.host.target.name, status_text(status),
                                   "; a read at sector %d, completed up to %d"
                                   % (start, start + result // SECTOR_SIZE) if result > 0 else ""))
        self.results.append((tag, result))

    def _failed_result(self, rid, op, start):
        """A failed READ completes its sectors before the first frame the target failed, if
        any: ublk_drv ends that many bytes and sends the rest again as a request of its own,
        which fails here from its first sector, so the reader learns where the failure is."""
        failed = self.engine.failed_frames(rid)
        good = failed[0][0] - start if failed and op == UBLK_IO_OP_READ else 0
        return good * SECTOR_SIZE if good > 0 else -errno.EIO

    def intake(self):
        """The requests the pump handed over, and the results to commit; False once the
        queue is gone (stopped or aborted)."""
        finished, error, handed = self.bridge.events()
        if error:
            ublk_check(error, "ublk queue")
        if finished:
            return False
        for r in handed:
            self._start(r)
        if self.results:
            for i, (tag, result) in enumerate(self.results):
                self.commit_tags[i], self.commit_results[i] = tag, result
            ublk_check(self.lib.ublk_queue_commit(self.queue, len(self.results), self.commit_tags,
                                                  self.commit_results), "ublk COMMIT_AND_FETCH_REQ")
            self.results = []
        return True

    def _start(self, r):
        """A request the pump handed over: answer it here, or send it through the engine."""
        tag, op = r.tag, r.op
        if not self.host.up or (op == UBLK_IO_OP_WRITE and self.host.readonly):
            self.results.append((tag, -errno.EIO))
            return
        if op == UBLK_IO_OP_FLUSH:            # its start_sector is meaningless: no bounds check
            self.inflight[tag] = (op, 0, 0)
            self.engine.submit(OP_FLUSH, 0, 0, None, req_id=tag)
            return
        if op not in (UBLK_IO_OP_READ, UBLK_IO_OP_WRITE):
            self.results.append((tag, -errno.EOPNOTSUPP))
            return
        nbytes = r.nr_sectors * SECTOR_SIZE
        try:
            self.engine.submit(OP_READ if op == UBLK_IO_OP_READ else OP_WRITE, r.start_sector,
                               r.nr_sectors, self.ffi.buffer(self.tag_buf[tag], nbytes), req_id=tag)
        except AoeError as e:
            self.log(str(e))
            self.results.append((tag, -errno.EIO))
            return
        self.inflight[tag] = (op, nbytes, r.start_sector)

    def report(self):
        return ("%d tags with the kernel"
                % (self.lib.ublk_queue_in_kernel(self.queue) if self.queue else 0))

    def stop(self):
        """STOP_DEV while still serving (the kernel writes back and flushes through the
        queue), then DEL_DEV."""
        self._control_served(UBLK_CMD_STOP_DEV, 0, "ublk STOP_DEV")
        limit = time.monotonic() + self.engine.deadsecs + CONTROL_LIMIT
        while self.host.serve(100000) and time.monotonic() < limit:
            pass
        self._close_queue()                       # DEL_DEV waits until /dev/ublkcN is closed
        ret = self.control.command(UBLK_CMD_DEL_DEV, self.dev_id)
        if ret < 0 and ret != -errno.ENOENT:
            raise AoeError("ublk DEL_DEV %d: %s" % (self.dev_id, os.strerror(-ret)))

    def close(self):
        self._close_queue()
        self.control.close()


def ublk_features_text(backend):
    lacking = backend.lacking()
    return "uses %s%s" % (", ".join(backend.features) or "no optional ublk feature",
                          "; this kernel lacks " + ", ".join(lacking) if lacking else "")


# --- NBD ----------------------------------------------------------------------
#
# The kernel's nbd driver, from <linux/nbd.h> and <linux/nbd-netlink.h>: the
# kernel sends requests on a stream socket (here one end of a socketpair) and
# reads the answers, in any order.  Devices are made through generic netlink
# (NBD_CMD_CONNECT picks a free device itself, and NBD_CMD_RECONFIGURE gives a
# device whose server died a new socket), or through ioctls where the kernel
# lacks it (the device then lives as long as the daemon).

NBD_SET_SOCK, NBD_SET_BLKSIZE, NBD_DO_IT, NBD_CLEAR_SOCK = 0xAB00, 0xAB01, 0xAB03, 0xAB04
NBD_SET_SIZE_BLOCKS, NBD_DISCONNECT, NBD_SET_TIMEOUT, NBD_SET_FLAGS = 0xAB07, 0xAB08, 0xAB09, 0xAB0A
NBD_GENL_NAME, NBD_GENL_VERSION = b"nbd", 1
NBD_GENL_CONNECT, NBD_GENL_DISCONNECT, NBD_GENL_RECONFIGURE, NBD_GENL_STATUS = 1, 2, 3, 5
NBD_ATTR_INDEX, NBD_ATTR_SIZE_BYTES, NBD_ATTR_BLOCK_SIZE_BYTES, NBD_ATTR_TIMEOUT = 1, 2, 3, 4
NBD_ATTR_SERVER_FLAGS, NBD_ATTR_SOCKETS, NBD_ATTR_DEAD_CONN_TIMEOUT = 5, 7, 8
NBD_SOCK_ITEM = NBD_SOCK_FD = 1
NETLINK_GENERIC = 16             # <linux/netlink.h>; the socket module lacks the name
NLM_F_REQUEST, NLM_F_ACK = 0x01, 0x04
NLMSG_ERROR = 2
GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 0x10, 3, 1, 2
NBD_TIMEOUT_MARGIN = 30           # seconds the kernel's per-request timeout exceeds deadsecs
NBD_MAX_READ = 64                 # requests read from the kernel and not yet answered
NBD_IN_CHUNK = 65536              # bytes of the request stream read at once in Python
IOV_MAX = 1024                    # pieces one sendmsg takes (<limits.h>)


class NetlinkError(OSError):
    pass


class Genetlink:
    """One generic netlink family (here "nbd"), standard library only: requests out,
    the kernel's answer messages and its acknowledgement back."""

    _HDR = struct.Struct("=IHHII")               # nlmsghdr: length, type, flags, seq, pid
    _GENL = struct.Struct("=BBH")                # genlmsghdr: command, version, reserved

    def __init__(self, name, version):
        self.version = version
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self.seq = random.getrandbits(24)
        self.family = GENL_ID_CTRL
        answers = self.request(CTRL_CMD_GETFAMILY, [(CTRL_ATTR_FAMILY_NAME, name + b"\0")],
                               version=1)
        found = [a[CTRL_ATTR_FAMILY_ID] for _, a in answers if CTRL_ATTR_FAMILY_ID in a]
        if not found:
            raise NetlinkError(errno.ENOENT, "no generic netlink family %s" % name.decode())
        self.family = struct.unpack("=H", found[0][:2])[0]

    @staticmethod
    def attr(kind, payload):
        """One attribute: u16 length, u16 type, payload padded to 4 bytes."""
        raw = struct.pack("=HH", 4 + len(payload), kind) + payload
        return raw + bytes(-len(raw) % 4)

    @staticmethod
    def attrs(data):
        """{type: payload} of a run of attributes."""
        found, off = {}, 0
        while off + 4 <= len(data):
            length, kind = struct.unpack_from("=HH", data, off)
            if length < 4:
                break
            found[kind & 0x3FFF] = bytes(data[off + 4:off + length])
            off += (length + 3) & ~3
        return found

    def request(self, cmd, attributes, version=None):
        """Send one request; returns [(command, {attribute: payload})] of the kernel's
        answers before its acknowledgement.  Raises NetlinkError for a negative one."""
        self.seq += 1
        body = self._GENL.pack(cmd, self.version if version is None else version, 0)
        body += b"".join(self.attr(k, v) for k, v in attributes)
        self.sock.send(self._HDR.pack(self._HDR.size + len(body), self.family,
                                      NLM_F_REQUEST | NLM_F_ACK, self.seq, 0) + body)
        answers = []
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + self._HDR.size <= len(data):
                length, kind, _, seq, _ = self._HDR.unpack_from(data, off)
                if length < self._HDR.size:
                    raise NetlinkError(errno.EPROTO, "malformed netlink message")
                payload = data[off + self._HDR.size:off + length]
                off += (length + 3) & ~3
                if seq != self.seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return answers
                answers.append((payload[0], self.attrs(payload[self._GENL.size:])))

    def close(self):
        self.sock.close()


def nbd_netlink():
    """The kernel's nbd generic netlink family, or None where it has none (before Linux
    4.12; Linux 6.1 outside the first network namespace)."""
    try:
        return Genetlink(NBD_GENL_NAME, NBD_GENL_VERSION)
    except OSError:
        return None


def nbd_socket_attr(sock):
    """NBD_ATTR_SOCKETS holding one socket."""
    return Genetlink.attr(NBD_SOCK_ITEM,
                          Genetlink.attr(NBD_SOCK_FD, struct.pack("=I", sock.fileno())))


def nbd_module_loaded():
    if not os.path.isdir("/sys/module/nbd") and shutil.which("modprobe"):
        subprocess.run(["modprobe", "-q", "nbd"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return os.path.isdir("/sys/module/nbd")


class NbdRequest:
    """A request the kernel sent, until it is answered."""

    __slots__ = ("handle", "command", "flags", "offset", "length", "buf", "got", "fua_pending",
                 "op")

    def __init__(self, handle, command, flags, offset, length):
        self.handle, self.command, self.flags, self.offset, self.length = \
            handle, command, flags, offset, length
        self.buf, self.got, self.fua_pending = None, 0, False
        self.op = None                            # the engine op in flight for it


class NbdBackend(BlockBackend):
    """/dev/nbdN: the daemon is the NBD server on its end of a socketpair, the kernel
    the client on the other.  This class makes, recovers and stops the device; the
    protocol is served by NbdBridged (the helper's pump) or NbdStream (Python)."""

    name = "nbd"

    def __init__(self, host, helper):
        self.host, self.engine, self.log = host, host.engine, host.log
        self.max_sectors, _ = request_layout(host.target)
        self.dev_id = None
        self.sock = None
        self.netlink = None
        # the ioctl interface's /dev/nbdN, held while it serves
        self.dev_fd = None
        self.do_it = None
        self.server = None                        # NbdBridged or NbdStream, once connected
        self.can_recover = False

    @staticmethod
    def frames_needed(target):
        """All of them: the kernel may send larger requests than asked for (max_sectors_kb is
        only set where it can be)."""
        return MAX_FRAMES

    @staticmethod
    def missing(helper=None):
        if not nbd_module_loaded():
            return "this kernel has no nbd driver ('modprobe nbd' failed; CONFIG_BLK_DEV_NBD)"
        return None

    @property
    def features(self):
        return ["netlink" if self.netlink is not None else "ioctls"]

    def resize(self, sectors):
        raise AoeError("%s cannot change size while attached (nbd sets the size only when it "
                       "connects): detach and attach again" % ("/dev/" + self.dev))

    def hand_over(self):
        raise AoeError("%s cannot be handed over (nbd cannot pause a device): detach and attach "
                       "again, or attach through ublk (Linux 6.16 or later)" % ("/dev/" + self.dev))

    @property
    def dev(self):
        return "nbd%d" % self.dev_id

    def _flags(self):
        return (NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA
                | (NBD_FLAG_READ_ONLY if self.host.readonly else 0))

    def _timeouts(self):
        """The kernel's per-request timeout (never before deadsecs), and how long it keeps
        a device whose server died waiting for attach --recover."""
        deadsecs = -int(-self.engine.deadsecs // 1)
        return deadsecs + NBD_TIMEOUT_MARGIN, max(deadsecs, QUIESCE_WAIT)

    def _new_socket(self):
        kernel_end, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        size_socket_buffers(self.sock)
        return kernel_end

    def create(self):
        if not nbd_module_loaded():
            raise AoeError("this kernel has no nbd driver: 'modprobe nbd' failed "
                           "(CONFIG_BLK_DEV_NBD)")
        kernel_end = self._new_socket()
        timeout, dead_conn = self._timeouts()
        try:
            self.netlink = None if os.environ.get("AOE_NBD_IOCTL") else nbd_netlink()
            if self.netlink is not None:
                self._netlink_connect(kernel_end, timeout, dead_conn)
                how = "netlink"
            else:
                self._ioctl_connect(kernel_end, timeout)
                how = "ioctl: no recovery, the device lives as long as this daemon"
        finally:
            kernel_end.close()                    # the kernel holds its own reference
        self.serve_socket()
        self._limit_request_size()
        self.host.record(self, STATE_UP, self.can_recover)
        open_in_thread("/dev/" + self.dev, "partition scan", self.log)
        self.log("attached %s as /dev/%s through nbd (%s): %d sectors%s, kernel timeout %d s"
                 % (self.host.target.name, self.dev, how, self.engine.sectors,
                    " read-only" if self.host.readonly else "", timeout))

    def _netlink_connect(self, kernel_end, timeout, dead_conn):
        """NBD_CMD_CONNECT: the kernel picks a free device (or makes one) and says which."""
        try:
            answers = self.netlink.request(NBD_GENL_CONNECT, [
                (NBD_ATTR_SIZE_BYTES, struct.pack("=Q", self.engine.sectors * SECTOR_SIZE)),
                (NBD_ATTR_BLOCK_SIZE_BYTES, struct.pack("=Q", SECTOR_SIZE)),
                (NBD_ATTR_SERVER_FLAGS, struct.pack("=Q", self._flags())),
                (NBD_ATTR_TIMEOUT, struct.pack("=Q", timeout)),
                (NBD_ATTR_DEAD_CONN_TIMEOUT, struct.pack("=Q", dead_conn)),
                (NBD_ATTR_SOCKETS, nbd_socket_attr(kernel_end))])
        except NetlinkError as e:
            raise AoeError("nbd: NBD_CMD_CONNECT failed: %s" % e.strerror)
        found = [a[NBD_ATTR_INDEX] for _, a in answers if NBD_ATTR_INDEX in a]
        if not found:
            raise AoeError("nbd: the kernel connected a device but did not say which")
        self.dev_id = struct.unpack("=I", found[0][:4])[0]
        self.can_recover = True

    def _ioctl_connect(self, kernel_end, timeout):
        """The older interface: take a free /dev/nbdN, configure it, and let a thread sit in
        NBD_DO_IT for as long as it serves."""
        for name in sorted(os.listdir("/sys/block"), key=lambda n: (len(n), n)):
            if not (name.startswith("nbd") and name[3:].isdigit()) or \
                    os.path.exists("/sys/block/%s/pid" % name):
                continue
            try:
                fd = os.open("/dev/" + name, os.O_RDWR)
            except OSError:
                continue
            try:
                # fails if another program sets it up
                fcntl.ioctl(fd, NBD_SET_SOCK, kernel_end.fileno())
            except OSError:
                os.close(fd)
                continue
            try:
                fcntl.ioctl(fd, NBD_SET_BLKSIZE, SECTOR_SIZE)
                fcntl.ioctl(fd, NBD_SET_SIZE_BLOCKS, self.engine.sectors)
                fcntl.ioctl(fd, NBD_SET_FLAGS, self._flags())
                fcntl.ioctl(fd, NBD_SET_TIMEOUT, timeout)
            except OSError as e:
                fcntl.ioctl(fd, NBD_CLEAR_SOCK)
                os.close(fd)
                raise AoeError("/dev/%s: setting it up failed: %s" % (name, e.strerror))
            self.dev_fd, self.dev_id = fd, int(name[3:])
            self.do_it = threading.Thread(target=self._do_it, name="nbd-do-it", daemon=True)
            self.do_it.start()
            return
        raise AoeError("no free /dev/nbdN (every one is in use): 'modprobe nbd "
                       "nbds_max=N' for more")

    def _do_it(self):
        """NBD_DO_IT returns only when the device is disconnected; signals stay with the
        main thread."""
        signal.pthread_sigmask(signal.SIG_BLOCK,
                               [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP])
        try:
            fcntl.ioctl(self.dev_fd, NBD_DO_IT)
        except OSError:
            pass

    def _limit_request_size(self):
        """Requests of at most one window of frames, as ublk gets (the kernel's own limit
        is 128 KiB to 1.25 MiB by version, and root may raise it to 32 MiB)."""
        try:
            with open("/sys/block/%s/queue/max_sectors_kb" % self.dev, "w") as f:
                f.write(str(self.max_sectors // 2))
        except OSError:
            pass

    def recover(self, attachment):
        """Give the device a new socket after its daemon died (NBD_CMD_RECONFIGURE); the
        requests the kernel kept waiting go out again on it."""
        if not attachment.recoverable:
            raise AoeError("%s was attached through nbd's ioctl interface, which cannot recover: "
                           "'aoe.py detach %s', then attach it again"
                           % (attachment.device, attachment.device))
        self.dev_id = attachment.dev_id
        timeout, dead_conn = self._timeouts()
        self.netlink = nbd_netlink()
        if self.netlink is None:
            raise AoeError("%s: this kernel's nbd has no netlink interface now: "
                           "detach and attach again"
                           % attachment.device)
        deadline = time.monotonic() + QUIESCE_WAIT
        # the kernel takes it once it saw the old socket close
        while True:
            kernel_end = self._new_socket()
            try:
                self.netlink.request(NBD_GENL_RECONFIGURE, [
                    (NBD_ATTR_INDEX, struct.pack("=I", self.dev_id)),
                    (NBD_ATTR_TIMEOUT, struct.pack("=Q", timeout)),
                    (NBD_ATTR_DEAD_CONN_TIMEOUT, struct.pack("=Q", dead_conn)),
                    (NBD_ATTR_SOCKETS, nbd_socket_attr(kernel_end))])
            except NetlinkError as e:
                kernel_end.close()
                raise AoeError("%s: /dev/%s cannot be given a new socket (%s); "
                               "detach it and attach again"
                               % (attachment.device, self.dev, e.strerror))
            kernel_end.close()
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if not ready or self.sock.recv(1, socket.MSG_PEEK):   # EOF: the kernel did not take it
                break
            self.sock.close()
            if time.monotonic() > deadline:
                raise AoeError("%s: /dev/%s still has a live socket after %d s: is "
                               "another daemon serving it?"
                               % (attachment.device, self.dev, QUIESCE_WAIT))
            time.sleep(0.2)
        self.can_recover = True
        self.serve_socket()
        self.host.record(self, STATE_UP, True)

    @staticmethod
    def remove_orphan(attachment):
        """Disconnect a device whose daemon is gone; an error text or None."""
        if not attachment.recoverable:
            return None                           # an ioctl device went with its daemon
        nl = nbd_netlink()
        if nl is None:
            return "disconnecting %s: the kernel's nbd netlink interface is gone" % attachment.block
        try:
            nl.request(NBD_GENL_DISCONNECT,
                       [(NBD_ATTR_INDEX, struct.pack("=I", attachment.dev_id))])
        except NetlinkError as e:
            return "disconnecting %s: %s" % (attachment.block, e.strerror)
        finally:
            nl.close()
        return None

    def serve_socket(self):
        """Serve the protocol on our end of the socket: in the helper's pump where it runs
        the engine, else here."""
        self.sock.setblocking(False)
        compiled = self.engine.compiled
        self.server = (NbdStream(self) if compiled is None
                       else NbdBridged(self, NbdBridge(compiled)))

    def inside(self, offset, length):
        """The request's bytes lie inside the device: only then does a length read from the
        stream get a buffer (the helper's nbd_inside)."""
        return offset + length <= self.engine.sectors * SECTOR_SIZE

    def refusal(self, command, offset, length):
        """The errno a request gets without going to the target, or 0."""
        if not self.host.up:
            return errno.EIO
        if command == NBD_CMD_FLUSH:
            return 0
        if command not in (NBD_CMD_READ, NBD_CMD_WRITE) or offset % SECTOR_SIZE \
                or length % SECTOR_SIZE or not length or not self.inside(offset, length):
            return errno.EINVAL
        if command == NBD_CMD_WRITE and self.host.readonly:
            return errno.EPERM
        return 0

    def failed(self, op, status):
        """After a failed request: True if it should go again (the flush fallback)."""
        if op == OP_FLUSH and self.engine.fall_back_flush(status):
            return True
        if not self.engine.dead:
            self.log("%s: %s" % (self.host.target.name, status_text(status)))
        return False

    def wait_fd(self):
        return self.server.wait_fd()

    def set_down(self, down):
        self.server.set_down(down)

    def intake(self):
        """Take what the kernel sent; False once the kernel has let go."""
        return self.server.intake()

    def completed(self, rid, status):
        self.server.completed(rid, status)

    @property
    def ended(self):
        return self.server is None or self.server.ended

    def report(self):
        return "%d requests from the kernel being served" % (self.server.open if self.server
                                                             else 0)

    def stop(self):
        """Write back what the kernel holds for the device (through this server), then
        disconnect, which fails whatever is still in flight."""
        if self.ended:
            return
        try:
            self.host.serve_while(lambda: flush_block_device("/dev/" + self.dev))
        except OSError as e:                      # a target that is down cannot take it
            self.log("writing back /dev/%s before disconnecting: %s" % (self.dev, e.strerror))
        if self.netlink is not None:
            self.host.serve_while(lambda: self.netlink.request(
                NBD_GENL_DISCONNECT, [(NBD_ATTR_INDEX, struct.pack("=I", self.dev_id))]))
        else:
            fcntl.ioctl(self.dev_fd, NBD_DISCONNECT)
            limit = time.monotonic() + self.engine.deadsecs + CONTROL_LIMIT
            while self.do_it.is_alive() and time.monotonic() < limit and self.host.serve(100000):
                pass
            fcntl.ioctl(self.dev_fd, NBD_CLEAR_SOCK)

    def close(self):
        if self.server is not None:
            self.server.close()                   # before the socket goes
            self.server = None
        if self.dev_fd is not None:
            os.close(self.dev_fd)
            self.dev_fd = None
        for s in (self.sock, self.netlink):
            if s is not None:
                s.close()
        self.sock = self.netlink = None


class NbdStream:
    """The NBD protocol served in Python (the pure-Python pump): each request becomes an
    engine request on its own buffer, many at once.  The stream is read in chunks, many
    headers a system call (a large write's data then straight into its buffer); a round's
    answers leave in one sendmsg, read data sent straight from its buffer.  FUA is a write
    followed by a flush."""

    def __init__(self, backend):
        self.backend, self.sock = backend, backend.sock
        self.engine, self.log = backend.engine, backend.log
        self.inbuf = bytearray(NBD_IN_CHUNK)
        self.inview = memoryview(self.inbuf)
        self.at = self.have = 0                   # inbuf[at:have]: read, not yet taken
        self.reading = None                       # the write request whose data is arriving
        self.requests = {}                        # engine request id -> NbdRequest
        self.answers = []                         # this round's, not sent yet
        self.next_id = 0
        self.ended = False

    @property
    def open(self):
        return len(self.requests)

    def wait_fd(self):
        """The socket, unless as many requests as we take at once are being served."""
        return self.sock.fileno() if len(self.requests) < NBD_MAX_READ else -1

    def set_down(self, down):
        pass                                      # each request looks at host.up

    def intake(self):
        """New requests in while there is room for them; then the round's answers out."""
        while not self.ended and len(self.requests) < NBD_MAX_READ:
            if self.reading is None and self._take_request():
                continue
            if self.ended or not self._read_some():
                break
        self._send_answers()
        return not self.ended

    def _take_request(self):
        """One request from the bytes read, with what of its write data came along; False
        when they hold no whole header."""
        if self.have - self.at < NBD_REQUEST.size:
            return False
        magic, kind, handle, offset, length = NBD_REQUEST.unpack_from(self.inbuf, self.at)
        self.at += NBD_REQUEST.size
        if magic != NBD_REQUEST_MAGIC:
            self.log("nbd: a request without the request magic (%#x): closing the socket" % magic)
            self.ended = True
            return False
        r = NbdRequest(handle, kind & 0xFFFF, kind & ~0xFFFF, offset, length)
        if r.command == NBD_CMD_DISC:
            self.ended = True
            return False
        if r.command == NBD_CMD_WRITE:
            # refused outside the device: its data is read and dropped (r.buf None)
            r.buf = bytearray(length) if self.backend.inside(offset, length) else None
            r.got = min(length, self.have - self.at)
            if r.buf is not None:
                r.buf[:r.got] = self.inview[self.at:self.at + r.got]
            self.at += r.got
            if r.got < length:                    # the rest is read straight into r.buf
                self.reading = r
                return True
        self._submit(r)
        return True

    def _read_some(self):
        """More of the stream: the arriving write's data into its buffer, else a chunk into
        ours; False when nothing more came now."""
        try:
            if self.reading is not None:
                r = self.reading
                if r.buf is None:                 # dropped: inbuf is empty, a scratch area
                    self.at = self.have = 0
                    n = self.sock.recv_into(self.inview[:r.length - r.got])
                else:
                    n = self.sock.recv_into(memoryview(r.buf)[r.got:])
                if n:
                    r.got += n
                    if r.got == r.length:
                        self.reading = None
                        self._submit(r)
            else:
                if self.at:                       # less than a header is left: to the front
                    rest = self.have - self.at
                    self.inbuf[:rest] = bytes(self.inview[self.at:self.have])
                    self.at, self.have = 0, rest
                n = self.sock.recv_into(self.inview[self.have:])
                self.have += n
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            self.log("nbd socket: %s" % e.strerror)
            n = 0
        if not n:
            self.ended = True                     # the kernel shut the socket: disconnected
            return False
        return True

    def _submit(self, r):
        """Into the engine, or answered at once when it cannot be."""
        error = self.backend.refusal(r.command, r.offset, r.length)
        if error:
            return self._reply(r, error)
        if r.command == NBD_CMD_FLUSH:
            return self._engine(r, OP_FLUSH, 0, 0, None)
        if r.command == NBD_CMD_READ:
            r.buf = bytearray(r.length)
        r.fua_pending = r.command == NBD_CMD_WRITE and bool(r.flags & NBD_CMD_FLAG_FUA)
        self._engine(r, OP_READ if r.command == NBD_CMD_READ else OP_WRITE, r.offset // SECTOR_SIZE,
                     r.length // SECTOR_SIZE, r.buf)

    def _engine(self, r, op, lba, count, buf):
        self.next_id += 1
        r.op = op
        try:
            self.engine.submit(op, lba, count, buf, req_id=self.next_id)
        except AoeError as e:
            self.log(str(e))
            return self._reply(r, errno.EIO)
        self.requests[self.next_id] = r

    def completed(self, rid, status):
        r = self.requests.pop(rid)
        if status:
            if self.backend.failed(r.op, status):
                return self._engine(r, OP_FLUSH, 0, 0, None)
            return self._reply(r, errno.EIO)
        if r.fua_pending:                         # written: now make it durable
            r.fua_pending = False
            return self._engine(r, OP_FLUSH, 0, 0, None)
        self._reply(r, 0)

    def _reply(self, r, error):
        """Answered at the end of the round (intake), with the round's other answers."""
        self.answers.append(NBD_REPLY.pack(NBD_REPLY_MAGIC, error, r.handle))
        if not error and r.command == NBD_CMD_READ:
            self.answers.append(r.buf)

    def _send_answers(self):
        if not self.answers:
            return
        parts, self.answers = self.answers, []
        try:
            send_all(self.sock, parts)
        except OSError as e:
            if not self.ended:
                self.log("nbd socket: %s" % e.strerror)
            self.ended = True

    def close(self):
        pass                                      # each round's answers left in its intake


class NbdBridged:
    """The NBD protocol served by the helper's pump (see NbdBridge): requests that go
    well never reach Python; failures and the requests it hands over come here."""

    def __init__(self, backend, bridge):
        self.backend, self.bridge, self.log = backend, bridge, backend.log
        self.engine = backend.engine
        self.ended = False
        bridge.open(backend.sock, NBD_MAX_READ, backend.max_sectors * SECTOR_SIZE,
                    self.engine.sectors, backend.host.readonly)

    @property
    def open(self):
        return self.bridge.open_requests

    def wait_fd(self):
        return self.backend.sock.fileno()

    def set_down(self, down):
        """While the target is down the pump hands every request over, and they fail here."""
        self.bridge.admit(not down)

    def intake(self):
        finished, error, handed = self.bridge.events()
        if error == -errno.EPROTO:
            self.log("nbd: a request without the request magic: closing the socket")
        elif error:
            self.log("nbd socket: %s" % os.strerror(-error))
        if finished:
            self.ended = True
            return False
        for r in handed:
            self._start(r)
        return True

    def _start(self, r):
        """A request the pump handed over: answered here, or sent through the engine."""
        error = self.backend.refusal(r.command, r.offset, r.length)
        if error:
            return self.bridge.reply(r.slot, error)
        if r.command == NBD_CMD_FLUSH:
            return self._engine(r.slot, OP_FLUSH, 0, 0, None)
        op = OP_READ if r.command == NBD_CMD_READ else OP_WRITE
        self._engine(r.slot, op, r.offset // SECTOR_SIZE, r.length // SECTOR_SIZE,
                     self.bridge.buffer(r.slot, r.length))

    def _engine(self, slot, op, lba, count, buf):
        try:
            self.engine.submit(op, lba, count, buf, req_id=NbdBridge.request_id(op, slot))
        except AoeError as e:
            self.log(str(e))
            self.bridge.reply(slot, errno.EIO)

    def completed(self, rid, status):
        """Only failures come back from the pump."""
        op, slot = NbdBridge.request_of(rid)
        if self.backend.failed(op, status):
            return self._engine(slot, OP_FLUSH, 0, 0, None)
        self.bridge.reply(slot, errno.EIO)

    def close(self):
        self.bridge.close()


def flush_block_device(path):
    """fsync a block device: its dirty pages written, then a flush of its write cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def send_all(sock, parts):
    """All of parts on a non-blocking stream socket, waiting for room as needed."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        try:
            n = sock.sendmsg(views[:IOV_MAX])
        except (BlockingIOError, InterruptedError):
            select.select([], [sock], [], 1.0)
            continue
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


BACKEND_CLASSES = {"ublk": UblkBackend, "nbd": NbdBackend}

# The kernel gives a one-queue device mq-deadline, which holds requests back to sort them and
# hands them to the daemon from a kernel worker: one more wake-up per batch.  The target orders
# its own disk's work, so "none" is the default (measured in the VM on Linux 7.3: random 4k at
# queue depth 32 1.4-1.9x as fast); "kernel" keeps the kernel's choice.
IO_SCHEDULERS = ("none", "mq-deadline", "kyber", "bfq", "kernel")


def set_io_scheduler(dev, name):
    """Give block device `dev` the I/O scheduler `name`; returns what was done, or raises."""
    path = "/sys/block/%s/queue/scheduler" % dev
    try:
        with open(path) as f:
            offered = f.read().split()           # e.g. "none [mq-deadline] kyber"
        current = next((n[1:-1] for n in offered if n.startswith("[")), "none")
        if name in ("kernel", current):
            return "I/O scheduler %s" % current
        if name not in [n.strip("[]") for n in offered]:
            raise AoeError("%s: the kernel has no I/O scheduler %s here (it offers: %s)"
                           % (dev, name, " ".join(offered)))
        with open(path, "w") as f:
            f.write(name)
    except OSError as e:
        raise AoeError("%s: cannot set the I/O scheduler to %s: %s" % (dev, name, e.strerror))
    return "I/O scheduler %s (the kernel chose %s)" % (name, current)


def choose_backend(wanted, helper):
    """The backend to attach with and why: ublk where the kernel and the helper allow it,
    NBD otherwise; `wanted` (ublk or nbd) forces one, with a clear error if it cannot work."""
    if wanted:
        problem = BACKEND_CLASSES[wanted].missing(helper)
        if problem:
            raise AoeError("--backend %s: %s" % (wanted, problem))
        return wanted, "as asked"
    why_not_ublk = UblkBackend.missing(helper)
    if why_not_ublk is None:
        return "ublk", "the kernel has ublk"
    problem = NbdBackend.missing()
    if problem:
        raise AoeError("cannot attach: no ublk (%s) and no nbd (%s)" % (why_not_ublk, problem))
    return "nbd", "no ublk: " + why_not_ublk


# =============================================================================
# Attach daemon: the process that serves attached devices, a thread for each
# =============================================================================

# How an AttachDaemon comes by its device.
START_CREATE = "create"           # a new device
START_RECOVER = "recover"         # one whose daemon died (attach --recover)
START_UPGRADE = "upgrade"         # one a running daemon hands over (attach --upgrade)
# What commands ask a running daemon (ask_daemon; answer_request).
VERB_DETACH = "detach"            # stop the device and remove it
VERB_RESIZE = "resize"            # take the target's new size (with "sectors")
VERB_HAND_OVER = "hand-over"      # pause the device and leave it to a new daemon
# How AttachDaemon.run ends.
RUN_STOP = "stop"                 # asked to (SIGTERM, SIGINT, detach): detach the device
RUN_GONE = "gone"                 # the kernel let go of the device: tidy up after it
RUN_HANDED_OVER = "handed-over"   # a new daemon serves the device now


class AttachOptions:
    """How a daemon serves its device (attach's --ro, --deadsecs, --maxout, --scheduler)."""

    def __init__(self, readonly=False, deadsecs=DEFAULT_DEADSECS, maxout=DEFAULT_MAXOUT,
                 scheduler=IO_SCHEDULERS[0]):
        self.readonly, self.deadsecs, self.maxout = readonly, deadsecs, maxout
        self.scheduler = scheduler


class AttachDaemon:
    """Serves one attached device: the engine, a backend, the record and links, and the
    target's state, which the record holds and the backend asks about:

        START_CREATE --------------------------------+
                                                     v
        START_RECOVER, START_UPGRADE -> recovering -> up <--- a probe is answered ---+
                                     (ublk)          | |                              |
                                                     | +---- deadsecs of silence --> down
                                      VERB_HAND_OVER v
                                               handing-over --> handed-over (RUN_HANDED_OVER)
                                                     |
                                                     +--> up, when the backend refuses

    While down, every request fails at once and sector 0 is read every PROBE_INTERVAL
    (failing after PROBE_DEADSECS).  Any state ends in detach (RUN_STOP) or in the kernel
    letting go (RUN_GONE); a record whose daemon is gone reads STATE_DEAD."""

    def __init__(self, helper, target, options, log, backend_class, start):
        self.target, self.log = target, log
        self.deadsecs = options.deadsecs
        self.io_scheduler = options.scheduler
        self.start = start                        # START_CREATE, _RECOVER or _UPGRADE
        for port in {p.port for p in target.paths}:
            port.keep_only(target.shelf, target.slot)
        self.engine = Engine(target, deadsecs=options.deadsecs, maxout=options.maxout,
                             helper=helper, frames=backend_class.frames_needed(target))
        self.state = STATE_UP
        self.attachment = None
        self.host = BackendHost(target, self.engine, log, options.readonly, self.record,
                                self.serve, self.serve_while)
        self.backend = backend_class(self.host, helper)
        self.probe_buf = bytearray(SECTOR_SIZE)
        self.probing = False
        self.next_probe = 0.0
        self.next_links = 0.0
        self.link_problem = None
        self.stop = False
        self.report_wanted = False
        self.request_wanted = False
        self.detach_token = None                  # a detach request, answered once detached

    def record(self, backend, state, recoverable):
        self._enter(state)
        self.attachment = Attachment(device=self.target.name, backend=backend.name, dev=backend.dev,
                                     dev_id=backend.dev_id, pid=os.getpid(), state=state,
                                     sectors=self.engine.sectors, readonly=self.host.readonly,
                                     recoverable=recoverable, log=log_path(self.target.name),
                                     features=backend.features)
        self.attachment.save()

    def _enter(self, state):
        """The one place the state changes: the backend sees only whether it is up."""
        self.state = state
        self.host.up = state == STATE_UP

    def create(self):
        self.backend.create()
        # In a thread of its own: a change of scheduler waits for the requests in flight (udev's
        # first look at a new device, say), which only this daemon can answer.
        threading.Thread(target=self._set_io_scheduler, name="io-scheduler", daemon=True).start()

    def _set_io_scheduler(self):
        try:
            self.log("%s: %s" % (self.backend.dev, set_io_scheduler(self.backend.dev,
                                                                    self.io_scheduler)))
        except AoeError as e:                     # the device works either way
            self.log("warning: %s" % e)

    def recover(self, attachment):
        if attachment.sectors != self.engine.sectors:
            raise AoeError("%s now has %d sectors, %s has %d: detach and attach again"
                           % (attachment.device, self.engine.sectors, attachment.block,
                              attachment.sectors))
        self.host.readonly = attachment.readonly
        self.backend.recover(attachment)
        self._set_state(STATE_UP)
        self.log("recovered %s: serving it again" % attachment.block)

    def _set_state(self, state):
        if state != self.state:
            self._enter(state)
            self.attachment.state = state
            self.attachment.save()

    def serve(self, timeout_us):
        """One round: the engine's completions to their owners, the backend's new requests
        in; False once the kernel has let go of the device."""
        for req_id, status in self.engine.poll(timeout_us, self.backend.wait_fd()):
            if req_id == PROBE_REQ:
                self._probe_done(status)
            else:
                self.backend.completed(req_id, status)
        if self.engine.dead and self.state == STATE_UP:
            self._set_state(STATE_DOWN)
            self.backend.set_down(True)
            self.next_probe = time.monotonic() + PROBE_INTERVAL
            self.log(self.engine.dead + "; I/O fails until it answers again")
        return self.backend.intake()

    def serve_while(self, call):
        """Run call() in another thread while serving (a control command the kernel
        completes only after I/O through the device); returns its result."""
        outcome = []

        def run():
            try:
                outcome.append((True, call()))
            except BaseException as e:
                outcome.append((False, e))
        worker = threading.Thread(target=run, name="control", daemon=True)
        worker.start()
        limit = time.monotonic() + self.engine.deadsecs + CONTROL_LIMIT
        while worker.is_alive() and time.monotonic() < limit and self.serve(10000):
            pass
        worker.join(max(0.0, limit - time.monotonic()))
        if not outcome:
            raise AoeError("a control command did not finish in %d s"
                           % (self.engine.deadsecs + CONTROL_LIMIT))
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def _probe(self):
        """While down: read sector 0 now and then; the first answer brings the device back."""
        if self.probing or time.monotonic() < self.next_probe or self.engine.pump.busy:
            return
        self.engine.revive()
        self.engine.deadsecs = PROBE_DEADSECS
        self.engine.submit(OP_READ, 0, 1, self.probe_buf, req_id=PROBE_REQ)
        self.probing = True

    def _probe_done(self, status):
        self.probing = False
        if status:
            self.next_probe = time.monotonic() + PROBE_INTERVAL
            return
        self.engine.deadsecs = self.deadsecs
        self.backend.set_down(False)
        self._set_state(STATE_UP)
        self.log("%s answers again; I/O resumes" % self.target.name)

    def refresh_links(self):
        problem = refresh_links(self.target.name, self.backend.dev)
        if problem and not self.link_problem:
            self.log(problem)
        self.link_problem = problem

    def report(self):
        """Counters into the log (SIGUSR1)."""
        self.log("state %s; %d requests at the target, %s\n%s"
                 % (self.state, self.engine.pump.active_requests, self.backend.report(),
                    self.engine.describe().rstrip()))

    def run(self):
        """Serve until asked to stop (SIGTERM, SIGINT, detach: RUN_STOP), the kernel lets
        go of the device (RUN_GONE) or it was handed to a new daemon (RUN_HANDED_OVER)."""
        while not self.stop:
            if self.report_wanted:
                self.report_wanted = False
                self.report()
            if self.request_wanted:
                self.request_wanted = False
                if self.answer_request() == VERB_HAND_OVER:
                    return RUN_HANDED_OVER
            if not self.serve(200000):
                self.log("the kernel let go of %s" % self.attachment.block)
                return RUN_GONE
            now = time.monotonic()
            if self.state == STATE_DOWN:
                self._probe()
            if now >= self.next_links:
                self.refresh_links()
                self.next_links = now + 1.0
        return RUN_STOP

    def main(self, ready):
        """The daemon's life: make the device (or recover it, or take it over), call
        ready(attachment), serve until asked to stop, then detach.  Returns the exit status."""
        name = self.target.name
        try:
            if self.start != START_CREATE:
                if self.start == START_UPGRADE:
                    take_over(Attachment.load(name), self.log)
                known = Attachment.load(name)
                if known is None:
                    raise AoeError("%s: its record in %s is gone: nothing to take over"
                                   % (name, RUN_DIR))
                self.recover(known)
            else:
                self.create()
            self.refresh_links()
            ready(self.attachment)
            outcome = self.run()
            if outcome == RUN_STOP:
                try:
                    self.detach()
                except AoeError as e:
                    if self.detach_token:
                        self.reply(self.detach_token, False, str(e))
                    raise
                if self.detach_token:
                    self.reply(self.detach_token, True, "%s detached" % self.attachment.block)
            elif outcome == RUN_GONE:
                self.forget()
            return EXIT_FAIL if outcome == RUN_GONE else EXIT_OK
        finally:
            self.close()
            self.release()

    def release(self):
        """A device left behind (handed over, or this daemon failed) waits for
        attach --recover: its record stops naming this process."""
        known = Attachment.load(self.target.name)
        if known is not None and known.pid == os.getpid() and self.attachment is not None \
                and known.dev == self.attachment.dev:
            known.pid = None
            known.save()

    def answer_request(self):
        """Do what a command asked through the request file (SIGHUP; see ask_daemon) and
        reply; returns the verb done.  The request is taken away, so that a SIGHUP meant
        for another device of this process does not repeat it."""
        path = daemon_file(self.target.name, "request")
        try:
            with open(path) as f:
                request = json.load(f)
            os.unlink(path)
            verb, token = request["verb"], request["token"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if verb == VERB_DETACH:
            self.stop, self.detach_token = True, token
            return verb
        try:
            if verb == VERB_RESIZE:
                message = self.resize(int(request["sectors"]))
            elif verb == VERB_HAND_OVER:
                self._set_state(STATE_HANDING_OVER)
                self.backend.hand_over()
                self._set_state(STATE_HANDED_OVER)
                message = "%s handed over by pid %d" % (self.attachment.block, os.getpid())
            else:
                raise AoeError("unknown request %r" % verb)
            ok = True
        except AoeError as e:
            ok, message, verb = False, str(e), None
            if self.state == STATE_HANDING_OVER:
                self._set_state(STATE_UP)
        self.log(message)
        self.reply(token, ok, message)
        return verb

    def reply(self, token, ok, message):
        reply = {"token": token, "ok": ok, "message": message}
        write_file(daemon_file(self.target.name, "reply"), json.dumps(reply))

    def resize(self, sectors):
        before = self.engine.sectors
        if sectors <= 0:
            raise AoeError("%s: refusing a size of %d sectors" % (self.target.name, sectors))
        if sectors != before:
            self.backend.resize(sectors)
            self.attachment.sectors = sectors
            self.attachment.save()
        return ("%s: %s resized from %d to %d sectors"
                % (self.target.name, self.attachment.block, before, sectors))

    def detach(self):
        """Stop the device cleanly (the kernel writes back and flushes through it first).
        A silent target fails the last I/O after DETACH_DEADSECS."""
        self.log("detaching %s" % self.attachment.block)
        self.engine.deadsecs = min(self.engine.deadsecs, DETACH_DEADSECS)
        self.deadsecs = self.engine.deadsecs
        self.backend.stop()
        remove_links(self.target.name, self.backend.dev)
        self.attachment.remove()
        self.log("detached %s" % self.attachment.block)

    def forget(self):
        """The kernel let go of the device (someone else stopped it): tidy up after it."""
        self.backend.close()
        problem = type(self.backend).remove_orphan(self.attachment)
        if problem:
            self.log(problem)
        remove_links(self.target.name, self.backend.dev)
        self.attachment.remove()

    def close(self):
        self.backend.close()
        self.engine.close()
        close_ports({path.port for path in self.target.paths})


DAEMON_ANSWER_WAIT = 30          # seconds a command waits for an attach daemon's reply


def notify_service_manager(state):
    """Tell systemd how a Type=notify service is doing ("READY=1", "STOPPING=1"), when it
    asked (NOTIFY_SOCKET); a no-op otherwise."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):                      # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.send(state.encode())
    except OSError:
        pass


def daemon_file(device, kind):
    """RUN_DIR/eX.Y.request or .reply: how commands ask a running attach daemon."""
    return os.path.join(RUN_DIR, "%s.%s" % (device, kind))


def ask_daemon(a, verb, wait=DAEMON_ANSWER_WAIT, **fields):
    """Ask a's daemon to do `verb` (it reads the request file on SIGHUP); returns its
    reply's message, or raises its error."""
    token = os.urandom(8).hex()
    request = dict(fields, verb=verb, token=token)
    write_file(daemon_file(a.device, "request"), json.dumps(request))
    os.kill(a.pid, signal.SIGHUP)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with open(daemon_file(a.device, "reply")) as f:
                reply = json.load(f)
        except (OSError, ValueError):
            reply = {}
        if reply.get("token") == token:
            if not reply.get("ok"):
                raise AoeError(reply.get("message", "the daemon refused"))
            return reply.get("message", "")
        if not a.daemon_alive:
            raise AoeError("%s: its daemon (pid %d) ended without answering; see %s"
                           % (a.device, a.pid, a.log))
        time.sleep(0.05)
    raise AoeError("%s: its daemon (pid %d) did not answer within %d s; see %s"
                   % (a.device, a.pid, wait, a.log))


def take_over(a, log):
    """attach --upgrade: the running daemon pauses the device and leaves; this one then
    serves it through user recovery, I/O held meanwhile, not failed."""
    log(ask_daemon(a, VERB_HAND_OVER))
    deadline = time.monotonic() + QUIESCE_WAIT
    while time.monotonic() < deadline:
        now = Attachment.load(a.device)
        if now is None or not now.daemon_alive:   # it ended, or let go of the device
            return
        time.sleep(0.05)
    raise AoeError("%s: pid %d handed the device over but did not let go of it within %d s"
                   % (a.device, a.pid, QUIESCE_WAIT))


def daemon_logger(device, path=None):
    """A device's log: lines into `path` (RUN_DIR/eX.Y.log), or onto stderr."""
    def log(message):
        line = ("%s %s[%d] %s: %s\n"
                % (time.strftime("%Y-%m-%d %H:%M:%S"), PROG, os.getpid(), device, message))
        if path is None:
            sys.stderr.write(line)
            sys.stderr.flush()
            return
        try:
            with open(path, "a") as f:
                f.write(line)
        except OSError:
            pass
    return log


def attach_summary(a):
    return ("%s is %s (%s, %.3fGB%s, through %s; daemon pid %d, log %s)"
            % (a.block, a.device, os.path.join(LINK_DIR, a.device), a.sectors * SECTOR_SIZE / 1e9,
               ", read-only" if a.readonly else "", a.backend, a.pid, a.log))


class DeviceHost:
    """The attach process: serves its devices (one for attach eX.Y, every match for
    attach --all), each by an AttachDaemon in a thread of its own with sockets of its own,
    so that a device costs its engine and its backend, not an interpreter.  A device whose
    thread fails is left for attach --recover; the others go on.  Signals reach every
    device: SIGTERM and SIGINT detach them, SIGHUP has each read its request file,
    SIGUSR1 logs their counters."""

    def __init__(self, helper, options, log_files):
        self.helper, self.options = helper, options
        self.log_files = log_files                # each device's log in its file, or stderr
        self.daemons = []
        self.threads = []
        self.lock = threading.Lock()
        self.stopping = False
        self.status = EXIT_OK
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.stop())
        signal.signal(signal.SIGHUP, lambda signum, frame: self._flag_all("request_wanted"))
        signal.signal(signal.SIGUSR1, lambda signum, frame: self._flag_all("report_wanted"))

    def stop(self):
        self.stopping = True
        self._flag_all("stop")

    def _flag_all(self, flag):
        """From signal handlers, which may run while this thread holds the lock: so no lock
        (copying the list is one step under the GIL)."""
        for daemon in list(self.daemons):
            setattr(daemon, flag, True)

    def attach(self, target, backend, start=START_CREATE):
        """Make target's device through `backend` (or, as `start` says, recover it or take
        it over) in a thread of its own; returns its Attachment once the device is ready,
        or raises AoeError."""
        own = {}
        for path in target.paths:                 # the inherited ones are the discovery's
            path.port = own.get(path.port.name) or own.setdefault(path.port.name,
                                                                 path.port.twin())
        log = daemon_logger(target.name, log_path(target.name) if self.log_files else None)
        try:
            daemon = AttachDaemon(self.helper, target, self.options, log,
                                  BACKEND_CLASSES[backend], start)
        except BaseException:
            close_ports(own.values())
            raise
        settled = threading.Event()
        failure = []
        thread = threading.Thread(target=self._serve, args=(daemon, settled, failure),
                                  name=target.name, daemon=True)
        with self.lock:
            self.daemons.append(daemon)
            self.threads.append(thread)
        if self.stopping:
            daemon.stop = True
        thread.start()
        settled.wait()
        if failure:
            raise AoeError(failure[0])
        return daemon.attachment

    def _serve(self, daemon, settled, failure):
        name = daemon.target.name
        code = EXIT_FAIL
        try:
            code = daemon.main(lambda attachment: settled.set())
        except AoeError as e:
            daemon.log(str(e))
            failure.append(str(e))
            code = e.code
        except Exception:
            import traceback
            left = ("; %s is left for 'aoe.py attach --recover %s' or 'aoe.py detach %s'"
                    % (daemon.attachment.block, name, name) if daemon.attachment else "")
            daemon.log("failed%s:\n%s" % (left, traceback.format_exc()))
            failure.append("internal error; the traceback is in %s" % log_path(name))
        finally:
            with self.lock:
                self.daemons.remove(daemon)
                self.threads.remove(threading.current_thread())
                self.status = max(self.status, code)
            settled.set()

    def wait(self):
        """Serve until every device has ended; returns the worst exit status."""
        told = False
        while True:
            if self.stopping and not told:
                notify_service_manager("STOPPING=1")
                told = True
            with self.lock:
                threads = list(self.threads)
            if not threads:
                break
            threads[0].join(0.2)
        if not told:
            notify_service_manager("STOPPING=1")
        return self.status


def tell_here(text, ok=True):
    """What an attach daemon tells: a device made onto stdout, a failure onto stderr."""
    if ok:
        print(text, flush=True)
    else:
        sys.stderr.write("%s: %s\n" % (PROG, text))


def run_in_background(logfile, body):
    """Run body(tell) in a daemon process of its own session, its output into logfile.
    What it tells is printed here (tell(text); tell(text, ok=False) for a failure) until it
    calls tell(None) or ends; returns EXIT_FAIL if it told of a failure, else EXIT_OK."""
    os.makedirs(RUN_DIR, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    freeze_gc_heap()                              # what exists now stays shared with the daemon
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        code = EXIT_FAIL
        channel = os.fdopen(wfd, "w")

        def tell(text, ok=True):
            if not channel.closed:
                channel.write(json.dumps(None if text is None else [ok, text]) + "\n")
                channel.flush()
                if text is None:
                    channel.close()
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(null)
            os.close(out)
            code = body(tell)
        except AoeError as e:
            sys.stderr.write("%s[%d]: %s\n" % (PROG, os.getpid(), e))
            tell(str(e), ok=False)
            code = e.code
        except BaseException:
            import traceback
            traceback.print_exc()
            tell("internal error; the traceback is in %s" % logfile, ok=False)
        finally:
            os._exit(code)
    os.close(wfd)
    status, done, told = EXIT_OK, False, False
    with os.fdopen(rfd) as channel:
        for line in channel:
            said = json.loads(line)
            if said is None:
                done = True
                break
            told = True
            ok, text = said
            tell_here(text, ok)
            if not ok:
                status = EXIT_FAIL
    if not done:
        os.waitpid(pid, 0)
        if not told:
            raise AoeError("the attach daemon ended without a word; see %s" % logfile)
    return status


# =============================================================================
# Target: serve a file or block device as eX.Y (what vblade does)
# =============================================================================

# requests we queue: the sockets hold 64 jumbo frames with room to spare
SERVE_BUFCNT = 64
SERVE_FIRMWARE = 0x4019          # reported firmware version
SERVE_MASK_MAX = 255             # mask list entries the target keeps
SERVE_RESERVE_MAX = 255


class Export:
    """The backing store: a window [offset, offset+length) of a file or block device, in sectors."""

    def __init__(self, path, readonly=False, direct=False, sync=False, offset=0, length=None):
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if direct:
            flags |= getattr(os, "O_DIRECT", 0)
        if sync:
            flags |= os.O_SYNC
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            raise usage_error("%s: cannot open: %s" % (path, e.strerror))
        size = os.lseek(self.fd, 0, os.SEEK_END) // SECTOR_SIZE
        if offset < 0 or offset >= size:
            raise usage_error("%s: offset %d is past its end (%d sectors)" % (path, offset, size))
        if length is not None and (length < 1 or offset + length > size):
            raise usage_error("%s: offset %d + length %d exceeds its %d sectors"
                              % (path, offset, length, size))
        self.path, self.readonly, self.sync = path, readonly, sync
        self.base = offset * SECTOR_SIZE
        self.sectors = (size - offset) if length is None else length
        self.bounce = None
        # O_DIRECT wants aligned buffers: one page-aligned mapping
        if direct:
            self.bounce = memoryview(mmap.mmap(-1, 256 * SECTOR_SIZE))

    def read(self, lba, count):
        if self.bounce is None:
            return os.pread(self.fd, count * SECTOR_SIZE, self.base + lba * SECTOR_SIZE)
        n = pread_into(self.fd, self.bounce[:count * SECTOR_SIZE], self.base + lba * SECTOR_SIZE)
        return bytes(self.bounce[:n])

    def write(self, lba, data):
        if self.bounce is None:
            return os.pwrite(self.fd, data, self.base + lba * SECTOR_SIZE)
        self.bounce[:len(data)] = data
        return pwrite_from(self.fd, self.bounce[:len(data)], self.base + lba * SECTOR_SIZE)

    def flush(self):
        os.fsync(self.fd)

    def close(self):
        os.close(self.fd)


SECTOR_ITEM = re.compile(r"(0x[0-9a-f]+|[0-9]+)(?:([-+])(0x[0-9a-f]+|[0-9]+))?$", re.I)


class SectorSet:
    """A set of sectors as sorted [start, end) ranges, overlapping and adjacent ones merged.
    Iterating gives the (start, end) ranges; len() counts the sectors."""

    def __init__(self, ranges=()):
        merged = []
        for start, end in sorted((s, e) for s, e in ranges if s < e):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]

    @classmethod
    def parse(cls, text):
        """From items separated by commas or white space ('#' comments to the end of the
        line): N, one sector; A-B, A to B inclusive; A+N, N sectors from A; numbers decimal
        or 0x hex.  Raises ValueError naming the first wrong item."""
        ranges = []
        for item in re.sub(r"#[^\n]*", "", text).replace(",", " ").split():
            m = SECTOR_ITEM.match(item)
            if not m:
                raise ValueError("%r is not N, A-B or A+N (decimal or 0x hex numbers)" % item)
            start, value = [int(t, 16 if t[:2].lower() == "0x" else 10) if t else 0
                            for t in m.group(1, 3)]
            how = m.group(2)
            if how == "-" and value < start:
                raise ValueError("%r ends before it starts" % item)
            if how == "+" and not value:
                raise ValueError("%r has no sectors" % item)
            end = value + 1 if how == "-" else start + value if how == "+" else start + 1
            ranges.append((start, end))
        if not ranges:
            raise ValueError("no sectors given")
        return cls(ranges)

    def __iter__(self):
        return zip(self.starts, self.ends)

    def __len__(self):
        return sum(end - start for start, end in self)

    def __eq__(self, other):
        return isinstance(other, SectorSet) and (self.starts, self.ends) == (other.starts,
                                                                             other.ends)

    def __repr__(self):
        return "SectorSet(%r)" % list(self)

    def first_in(self, lba, count):
        """The first sector of lba..lba+count-1 in the set, or None."""
        i = bisect.bisect_right(self.ends, lba)   # the first range ending after lba
        if count > 0 and i < len(self.starts) and self.starts[i] < lba + count:
            return max(lba, self.starts[i])
        return None

    def touches(self, lba, count):
        return self.first_in(lba, count) is not None

    def __contains__(self, lba):
        return self.touches(lba, 1)


class HeldFrames:
    """Frames to send later, each at its time (time.monotonic()), the soonest first."""

    def __init__(self):
        self.heap, self.added = [], 0

    def __len__(self):
        return len(self.heap)

    def add(self, due, frame):
        self.added += 1                           # ties leave in the order they came
        heapq.heappush(self.heap, (due, self.added, frame))

    def due(self, now):
        """The frames whose time has come, taken out."""
        ready = []
        while self.heap and self.heap[0][0] <= now:
            ready.append(heapq.heappop(self.heap)[2])
        return ready

    def wait(self, now):
        """Seconds until the next frame is due, or None when none is held."""
        return max(0.0, self.heap[0][0] - now) if self.heap else None


BAD_SECTOR_ERRORS = {"abrt": ATA_ABORTED, "unc": ATA_UNC}


class BadSectors:
    """Testing aid (serve --fault-bad): sectors no READ gets, as on a failing disk.  A READ
    touching them is answered as vblade answers a pread that stops at the first one: with
    the sectors before it, status ERR|DRDY, error ABRT (vblade's) or UNC (a disk's), the
    count of sectors not transferred; `delay_ms` late, as a disk retrying inside, without
    holding up other answers.  Writes to them succeed as usual and leave them unreadable:
    the set is fixed for the run."""

    def __init__(self, sectors, error=ATA_ABORTED, delay_ms=0.0):
        self.sectors, self.error, self.delay = sectors, error, delay_ms / 1000.0


# ATA meaning, apart from AoE (as vblade keeps ata.c apart from aoe.c): AtaDisk executes one
# ATA command on an export; AoeTarget below checks who may ask and carries the registers
# between the wire and the disk.
ATA_READS = (ATA_CMD_PIO_READ, ATA_CMD_PIO_READ_EXT)
ATA_WRITES = (ATA_CMD_PIO_WRITE, ATA_CMD_PIO_WRITE_EXT)
ATA_LBA48_COMMANDS = (ATA_CMD_PIO_READ_EXT, ATA_CMD_PIO_WRITE_EXT)
ATA_FLUSHES = (ATA_CMD_FLUSH, ATA_CMD_FLUSH_EXT)
ATA_POWER_ACTIVE = 0xFF          # CHECK POWER MODE's count: active or idle


class AtaCommand:
    """The registers a host writes for one ATA command, and a write's data.  The LBA is
    as the host gave it: an LBA28 command uses its low 28 bits."""

    __slots__ = ("cmd", "lba", "count", "features", "data")

    def __init__(self, cmd, lba=0, count=0, features=0, data=b""):
        self.cmd, self.lba, self.count, self.features, self.data = cmd, lba, count, features, data


class AtaOutcome:
    """The registers a command leaves: status, error and count (after an error, the
    sectors not transferred; CHECK POWER MODE's power mode); the data read; and `delay`,
    seconds to wait before telling (serve --fault-bad's slow unreadable sectors)."""

    __slots__ = ("status", "error", "count", "data", "delay")

    def __init__(self, status=ATA_DRDY, error=0, count=0, data=b"", delay=0.0):
        self.status, self.error, self.count, self.data, self.delay = (status, error, count, data,
                                                                      delay)

    def __repr__(self):
        return "AtaOutcome(status=%#x, error=%#x, count=%d, %d bytes, delay=%g)" % (
            self.status, self.error, self.count, len(self.data), self.delay)


class AtaDisk:
    """An export as an ATA disk, knowing nothing of AoE: IDENTIFY DEVICE, READ/WRITE
    SECTORS (EXT), FLUSH CACHE (EXT) and CHECK POWER MODE; any other command is aborted.
    A command the transfer cannot carry (IDENTIFY of other than one sector, over
    `max_count` sectors, a write short of its data) is refused: execute() returns None and
    the caller answers as its protocol says.  Sectors read and written, and reads that
    met an unreadable sector, are counted in `stats`."""

    def __init__(self, export, identify, max_count, bad=None, stats=None):
        self.export, self.identify, self.max_count = export, identify, max_count
        self.bad = bad                            # BadSectors, or None
        self.stats = collections.Counter() if stats is None else stats

    def execute(self, command):
        """An AtaOutcome, or None for a command refused."""
        cmd = command.cmd
        if cmd == ATA_CMD_ID_ATA:
            return AtaOutcome(data=self.identify) if command.count == 1 else None
        if cmd in ATA_READS or cmd in ATA_WRITES:
            return self._transfer(command)
        if cmd in ATA_FLUSHES:
            return self._flush(command)
        if cmd == ATA_CMD_CHK_POWER:
            return AtaOutcome(count=ATA_POWER_ACTIVE)
        return self._failed(command, ATA_ABORTED)

    @staticmethod
    def _failed(command, error, data=b"", delay=0.0):
        """ERR with `error`; the count is what is left to transfer (as vblade says): all of
        it but the sectors of `data`."""
        return AtaOutcome(ATA_DRDY | ATA_ERR, error, command.count - len(data) // SECTOR_SIZE,
                          data, delay)

    def _transfer(self, command):
        write, count = command.cmd in ATA_WRITES, command.count
        if count > self.max_count or (write and len(command.data) < count * SECTOR_SIZE):
            return None
        lba = command.lba if command.cmd in ATA_LBA48_COMMANDS else command.lba & LBA28_MAX
        if lba + count > self.export.sectors:
            return self._failed(command, ATA_IDNF)
        if write and self.export.readonly:
            return self._failed(command, ATA_ABORTED)
        try:
            return self._write(command, lba) if write else self._read(command, lba)
        except OSError:
            return self._failed(command, ATA_UNC)

    def _write(self, command, lba):
        size = command.count * SECTOR_SIZE
        if self.export.write(lba, command.data[:size]) != size:
            return self._failed(command, ATA_UNC)
        self.stats["sectors_written"] += command.count
        return AtaOutcome()

    def _read(self, command, lba):
        """The sectors, or as a pread that stops at the first unreadable one: those before
        it, failed with the unreadable sectors' error, late by their delay."""
        first_bad = self.bad.sectors.first_in(lba, command.count) if self.bad else None
        good = command.count if first_bad is None else first_bad - lba
        data = self.export.read(lba, good)
        self.stats["sectors_read"] += good
        if len(data) != good * SECTOR_SIZE:
            return self._failed(command, ATA_UNC)
        if first_bad is not None:
            self.stats["unreadable"] += 1
            return self._failed(command, self.bad.error, data, self.bad.delay)
        return AtaOutcome(data=data)

    def _flush(self, command):
        try:
            if not self.export.readonly:
                self.export.flush()
        except OSError:
            return self._failed(command, ATA_ABORTED)
        return AtaOutcome()


class FaultPlan:
    """Testing aid: drop, duplicate, delay (with jitter) or reorder a fraction of
    responses; and, as a hostile target would, send forged answers before the
    true one to a fraction of READs: a tag with one bit flipped, the right tag
    with another LBA's echo and data, with a wrong count or command, cut short,
    from another MAC, for another shelf, not marked as a response, with a random
    tag, and earlier answers replayed late."""

    def __init__(self, drop=0.0, duplicate=0.0, delay_ms=0.0, jitter_ms=0.0, reorder=0.0, forge=0.0,
                 seed=None):
        self.drop, self.duplicate, self.reorder, self.forge = drop, duplicate, reorder, forge
        self.delay, self.jitter = delay_ms / 1000.0, jitter_ms / 1000.0
        self.rng = random.Random(seed)
        self.held = HeldFrames()                  # for delay and reorder
        self.history = collections.deque(maxlen=64)   # recent true answers, to replay late

    @property
    def active(self):
        return bool(self.drop or self.duplicate or self.delay or self.jitter or self.reorder
                    or self.forge)

    def outgoing(self, reply, request=b"", export=None):
        """Frames to send now for one response (none, one, two, or forgeries first); the rest
        are held."""
        r = self.rng.random
        out = self.forgeries(request, reply, export) if self.forge and r() < self.forge else []
        if r() < self.drop:
            return out
        mine = [reply, reply] if r() < self.duplicate else [reply]
        if self.delay or self.jitter or r() < self.reorder:
            due = (time.monotonic()
                   + max(0.0, (self.delay or 0.002) + self.rng.uniform(-self.jitter, self.jitter)))
            for f in mine:
                self.held.add(due, f)
            return out
        return out + mine

    def forgeries(self, request, reply, export):
        """Wrong answers to a READ, three kinds of them at random."""
        try:
            f = parse_frame(request)
            a = parse_ata(f)
        except FrameError:
            return []
        if f.command != AOECMD_ATA or \
                a.cmd_status not in ATA_READS or \
                len(reply) < ATA_HDR_LEN + a.count * SECTOR_SIZE:
            return []
        rng, data = self.rng, reply[ATA_HDR_LEN:ATA_HDR_LEN + a.count * SECTOR_SIZE]
        limit = (export.sectors if export else 0) - a.count

        def answer(tag=f.tag, aflags=a.aflags, count=0, lba=a.lba, payload=data, src=None,
                   shelf=None, flags=AOEFL_RSP):
            body = AtaFields(aflags, 0, count, ATA_DRDY, lba, payload)
            return pack_ata(f.src, src or reply[6:12], f.shelf if shelf is None else shelf, f.slot,
                            tag, body, flags)

        other = (max(0, min(limit, a.lba + rng.choice((-1, 1)) * max(1, a.count))) if limit > 0
                 else a.lba)
        kinds = [
            lambda: answer(tag=f.tag ^ 1 << rng.randrange(30)),
            lambda: answer(lba=other, payload=export.read(other, a.count) if export else data),
            lambda: answer(count=min(255, a.count + 1)),
            lambda: answer(aflags=a.aflags ^ AOEAFL_WRITE),
            lambda: answer()[:ATA_HDR_LEN + len(data) // 2],
            lambda: answer(src=bytes([2]) + rng.getrandbits(40).to_bytes(5, "big")),
            lambda: answer(shelf=(f.shelf + 1) % AOE_SHELF_ANY),
            lambda: answer(flags=0),
            lambda: answer(tag=rng.getrandbits(32),
                           payload=rng.getrandbits(8 * len(data)).to_bytes(len(data), "big")),
        ]
        out = [rng.choice(kinds)() for _ in range(3)]
        if self.history:
            out.append(rng.choice(self.history))
        self.history.append(reply)
        return out

    def due(self):
        return self.held.due(time.monotonic())


class AoeTarget:
    """The AoE side of a target (vblade's aoe.c): one request frame in, one response (or
    none) out.  Config, masks and reservations are kept here; ATA commands go to self.disk."""

    def __init__(self, shelf, slot, export, mac, mtu, bufcnt=SERVE_BUFCNT, masks=(),
                 model="aoe.py export", serial=None, bad=None):
        self.shelf, self.slot, self.mac = shelf, slot, mac
        self.later = HeldFrames()                 # answers to send later (an outcome.delay)
        self.bufcnt = bufcnt
        self.scnt = min(255, frame_sectors(mtu))
        self.config = b""
        self.masks = list(masks)
        self.reserved = []
        self.drops = DropCounters()
        self.stats = collections.Counter()
        serial = serial or "%d.%d:%s" % (shelf, slot, socket.gethostname())
        identify = build_identify(export.sectors, model, serial, "V" + __version__)
        self.disk = AtaDisk(export, identify, self.scnt, bad, self.stats)

    @property
    def export(self):
        """The disk's backing store (also read by serve's fast path and its fault plan)."""
        return self.disk.export

    @export.setter
    def export(self, export):
        self.disk.export = export

    def config_info(self, ccmd=AOECCMD_READ):
        return ConfigInfo(self.bufcnt, SERVE_FIRMWARE, self.scnt, 1, ccmd, self.config)

    def announce(self):
        """The unsolicited Query Config answer a target broadcasts when it starts."""
        return pack_cfg(BROADCAST_MAC, self.mac, self.shelf, self.slot, 0, self.config_info(),
                        AOEFL_RSP)

    def handle(self, data):
        """Request bytes -> response bytes, or None: silent (counted), or answering later
        (self.later holds the answer)."""
        try:
            f = parse_frame(data)
        except FrameError as e:
            self.drops[e.reason] += 1
            return None
        if f.is_response:
            self.drops["response"] += 1
            return None
        if f.shelf not in (self.shelf, AOE_SHELF_ANY) or f.slot not in (self.slot, AOE_SLOT_ANY):
            self.drops["other_target"] += 1
            return None
        if self.masks and f.src not in self.masks:
            self.drops["masked"] += 1
            return None
        self.stats["requests"] += 1
        try:
            if f.command == AOECMD_ATA:
                return self._ata(f)
            if f.command == AOECMD_CFG:
                return self._cfg(f)
            if f.command == AOECMD_MASK:
                return self._mask(f)
            if f.command == AOECMD_RESERVE:
                return self._reserve(f)
            return self._error(f, AOEERR_BADCMD, data)
        except FrameError as e:
            self.drops[e.reason] += 1
            return None

    def _reply_header(self, f, command, flags=0, error=0):
        return pack_header(f.src, self.mac, self.shelf, self.slot, command, f.tag,
                           AOEFL_RSP | flags, error)

    def _error(self, f, code, data):
        return pad_frame(self._reply_header(f, f.command, AOEFL_ERR, code) + bytes(f.body))

    def _ata(self, f):
        """The AoE side of an ATA request: only to us by name, the reservation obeyed
        (IDENTIFY excepted), a command the disk refuses answered "bad argument"; the
        disk's registers go back with the request's aflags and LBA."""
        if f.shelf != self.shelf or f.slot != self.slot:
            self.drops["broadcast_ata"] += 1
            return None
        a = parse_ata(f)
        if a.cmd_status != ATA_CMD_ID_ATA and self.reserved and f.src not in self.reserved:
            return self._ata_reply(f, a, AOEFL_ERR, AOEERR_RESERVED)
        done = self.disk.execute(AtaCommand(a.cmd_status, a.lba, a.count, a.err_feature, a.data))
        if done is None:
            return self._ata_reply(f, a, AOEFL_ERR, AOEERR_BADARG)
        reply = pack_ata(f.src, self.mac, self.shelf, self.slot, f.tag,
                         AtaFields(a.aflags, done.error, done.count, done.status, a.lba, done.data),
                         AOEFL_RSP)
        if done.delay:
            self.later.add(time.monotonic() + done.delay, reply)
            return None
        return reply

    def _ata_reply(self, f, a, flags, error):
        reply = AtaFields(a.aflags, a.err_feature, a.count, a.cmd_status, a.lba)
        return pack_ata(f.src, self.mac, self.shelf, self.slot, f.tag, reply, AOEFL_RSP | flags,
                        error)

    def _cfg(self, f):
        q = parse_cfg(f)
        ours = self.config
        if q.ccmd == AOECCMD_TEST and q.config != ours:
            return None
        if q.ccmd == AOECCMD_PTEST and not ours.startswith(q.config):
            return None
        flags = error = 0
        if q.ccmd == AOECCMD_SET and ours and ours != q.config:
            flags, error = AOEFL_ERR, AOEERR_CFGSET
        elif q.ccmd in (AOECCMD_SET, AOECCMD_FSET):
            self.config = q.config
        elif q.ccmd > AOECCMD_FSET:
            flags, error = AOEFL_ERR, AOEERR_BADARG
        return pack_cfg(f.src, self.mac, self.shelf, self.slot, f.tag, self.config_info(q.ccmd),
                        AOEFL_RSP | flags, error)

    def _mask(self, f):
        m = parse_mask(f)
        merror = 0
        if m.mcmd == MCMD_EDIT:
            for i, (dcmd, mac) in enumerate(m.directives):
                if dcmd == DCMD_ADD:
                    if mac not in self.masks:
                        if len(self.masks) >= SERVE_MASK_MAX:
                            merror = MERROR_FULL
                            break
                        self.masks.append(mac)
                elif dcmd == DCMD_DELETE:
                    if mac in self.masks:
                        self.masks.remove(mac)
                elif dcmd != DCMD_NONE:
                    merror = MERROR_BADDIR
                    break
        elif m.mcmd != MCMD_READ:
            return pack_mask(f.src, self.mac, self.shelf, self.slot, f.tag, m,
                             AOEFL_RSP | AOEFL_ERR, AOEERR_BADARG)
        reply = MaskInfo(m.mcmd, merror, [(DCMD_NONE, mac) for mac in self.masks])
        return pack_mask(f.src, self.mac, self.shelf, self.slot, f.tag, reply, AOEFL_RSP)

    def _reserve(self, f):
        r = parse_reserve(f)
        flags = error = 0
        if r.rcmd == RCMD_SET and self.reserved and f.src not in self.reserved:
            flags, error = AOEFL_ERR, AOEERR_RESERVED
        elif r.rcmd in (RCMD_SET, RCMD_FORCE):
            if len(r.macs) > SERVE_RESERVE_MAX:
                flags, error = AOEFL_ERR, AOEERR_BADARG
            else:
                self.reserved = list(r.macs)
        elif r.rcmd != RCMD_READ:
            flags, error = AOEFL_ERR, AOEERR_BADARG
        reply = ReserveInfo(r.rcmd, self.reserved)
        return pack_reserve(f.src, self.mac, self.shelf, self.slot, f.tag, reply, AOEFL_RSP | flags,
                            error)


def serve_loop(target, port, faults=None, stop=lambda: False):
    """Answer requests until stop() is true.  Pure Python: one frame per call."""
    sock = port.sock
    port.send(target.announce())
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    buf = bytearray(65536)
    view = memoryview(buf)
    while not stop():
        timeout = 2 if faults and faults.held else 200
        later = target.later.wait(time.monotonic())
        if later is not None:
            timeout = min(timeout, int(later * 1000) + 1)
        poller.poll(timeout)
        for _ in range(256):
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            reply = target.handle(view[:n])
            if reply is None:
                continue
            for frame in (faults.outgoing(reply, view[:n], target.export) if faults else (reply,)):
                port.send(frame)
        if faults and faults.held:
            for frame in faults.due():
                port.send(frame)
        for frame in target.later.due(time.monotonic()):
            port.send(frame)


# The helper's "Target fast path" answers ATA READ/WRITE in C; AoeTarget.handle
# still decides every other frame.  Several sockets share the interface's AoE
# frames (PACKET_FANOUT, round robin, so even one initiator's frames spread over
# them), one thread each: cffi lets go of the GIL inside aoe_srv_pump.
PACKET_FANOUT = 18               # <linux/if_packet.h>
PACKET_FANOUT_LB = 1             # round robin (hash and cpu modes keep one initiator on one socket)
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000   # the group's own PACKET_IGNORE_OUTGOING
SERVE_SLICE_US = 100000          # a pump returns at least this often, so stop is noticed


def serve_threads():
    """Fast-path threads: one per CPU we may run on but one, at most 4 (AOE_SERVE_THREADS
    overrides).  The spare CPU is for the kernel's receive work (and, on a 2-CPU machine, an
    initiator there): on 2 CPUs with the initiator alongside, a second thread measured slower,
    not faster."""
    text = os.environ.get("AOE_SERVE_THREADS", "")
    if text.isdigit() and int(text) > 0:
        return int(text)
    return max(1, min(4, len(os.sched_getaffinity(0)) - 1))


def fanout_ports(ifc, count):
    """Up to `count` Ports on one interface, each receiving a share of its AoE frames,
    and why there are fewer (None if not)."""
    ports = [Port(ifc)]
    if count < 2:
        return ports, None
    mode = PACKET_FANOUT_LB | PACKET_FANOUT_FLAG_IGNORE_OUTGOING
    try:
        first = ports[0].sock
        first.setsockopt(SOL_PACKET, PACKET_FANOUT, (mode | PACKET_FANOUT_FLAG_UNIQUEID) << 16)
        group = first.getsockopt(SOL_PACKET, PACKET_FANOUT) & 0xFFFF
        while len(ports) < count:
            ports.append(Port(ifc))
            ports[-1].sock.setsockopt(SOL_PACKET, PACKET_FANOUT, group | mode << 16)
    except OSError as e:
        close_ports(ports[1:])                    # a socket outside the group would see every frame
        return ports[:1], "PACKET_FANOUT: %s" % e.strerror
    return ports, None


class FastServe:
    """serve's data path in the helper: per port a thread loops in aoe_srv_pump, which
    answers READ/WRITE itself and returns the other frames (and READs of unreadable
    sectors); those go through AoeTarget.handle under one lock, after which the mask
    and reservation lists are mirrored into every struct aoe_srv again.  Answers the
    target holds for later leave from whichever thread finds them due."""

    _STATS = ("batches", "sectors_read", "sectors_written", "io_errors", "send_lost")
    _DROPS = ("short", "not_aoe", "version", "response", "other_target", "masked", "oversize")

    def __init__(self, helper, target, ports, frame_max):
        self.ffi, self.lib = helper.ffi, helper.lib
        self.target, self.ports = target, ports
        self.lock = threading.Lock()
        self.stopping = False
        self.failure = None
        self.lists = None
        self.srvs = []
        export = target.export
        for port in ports:
            srv = self.lib.aoe_srv_new(frame_max)
            if srv == self.ffi.NULL:
                raise AoeError("out of memory for the serve fast path")
            srv = self.ffi.gc(srv, self.lib.aoe_srv_free)
            srv.sock_fd, srv.file_fd = port.fileno(), export.fd
            self.ffi.memmove(srv.mac, target.mac, ETH_ALEN)
            srv.shelf, srv.slot, srv.readonly = (target.shelf, target.slot,
                                                 1 if export.readonly else 0)
            srv.base, srv.sectors, srv.scnt = export.base, export.sectors, target.scnt
            if target.disk.bad:
                bad = target.disk.bad.sectors
                rc = self.lib.aoe_srv_set_bad(srv, self.ffi.new("uint64_t[]", bad.starts),
                                              self.ffi.new("uint64_t[]", bad.ends),
                                              len(bad.starts))
                if rc < 0:
                    raise AoeError("serve fast path: cannot take the unreadable sectors: %s"
                                   % os.strerror(-rc))
            self.srvs.append(srv)
        self.mirror()

    def mirror(self):
        """Copy the target's mask and reservation lists into C when they changed."""
        lists = (tuple(self.target.masks), tuple(self.target.reserved))
        if lists == self.lists:
            return
        masks, reserved = b"".join(lists[0]), b"".join(lists[1])
        for srv in self.srvs:
            rc = self.lib.aoe_srv_set_lists(srv, masks, len(lists[0]), reserved, len(lists[1]))
            if rc < 0:
                raise AoeError("serve fast path: cannot take the lists: %s" % os.strerror(-rc))
        self.lists = lists

    def answer_slow(self, srv, port, n):
        """The n frames the C pump handed back: Python's target answers them, in order."""
        frames = [self.ffi.buffer(srv.slow[i].data, srv.slow[i].len)[:] for i in range(n)]
        with self.lock:
            for data in frames:
                reply = self.target.handle(data)
                if reply is not None:
                    port.send(reply)
            self.mirror()

    def send_due(self, port):
        """Send the held answers that are due; returns how long the next pump may wait
        (microseconds): SERVE_SLICE_US, or less, until the next held answer is due."""
        later = self.target.later
        if not later:       # unlocked: a thread that holds an answer sees it here after all
            return SERVE_SLICE_US
        with self.lock:
            now = time.monotonic()
            frames, wait = later.due(now), later.wait(now)
        for frame in frames:
            port.send(frame)
        return SERVE_SLICE_US if wait is None else min(SERVE_SLICE_US, int(wait * 1000000) + 1)

    def _work(self, srv, port):
        lib = self.lib
        timeout = SERVE_SLICE_US
        try:
            while not self.stopping:
                n = lib.aoe_srv_pump(srv, timeout)
                if n < 0:
                    raise AoeError("%s: serve fast path: %s" % (port.name, os.strerror(-n)))
                if n:
                    self.answer_slow(srv, port, n)
                timeout = self.send_due(port)
        except BaseException as e:                # ends serve, reported by run()
            self.failure = self.failure or e
            self.stopping = True

    def run(self, stop):
        """Answer requests until stop() is true (or a thread fails: raised here)."""
        self.ports[0].send(self.target.announce())
        threads = [threading.Thread(target=self._work, args=(srv, port), name="serve-%d" % i,
                                    daemon=True)
                   for i, (srv, port) in enumerate(zip(self.srvs, self.ports))]
        for t in threads:
            t.start()
        try:
            while not stop() and not self.stopping:
                time.sleep(0.1)
        finally:
            self.stopping = True
            for t in threads:
                t.join()
            self._count()
        if self.failure:
            raise self.failure

    def _count(self):
        """Add the C counters to the target's stats and drops (shown by serve -v)."""
        t = self.target
        for srv in self.srvs:
            c = srv.c
            t.stats["requests"] += c.frames_fast
            t.stats["fast_path"] += c.frames_fast
            for k in self._STATS:
                t.stats[k] += getattr(c, k)
            for k in self._DROPS:
                t.drops[k] += getattr(c, "drop_" + k)


# =============================================================================
# Rescue: a failing disk imaged as GNU ddrescue does, with its mapfile
# =============================================================================
#
# The map covers the device from byte 0 in contiguous blocks, each with a status
# from GNU ddrescue's mapfile, from less to more processed.  The phases read only
# inside the domain (--offset/--length):
#   copying   the non-tried blocks in clusters, many in flight; a frame the target
#             fails leaves its sectors non-trimmed (one sector: bad) and the rest of
#             its request is kept; pass 1 skips ahead after an error, by a skip that
#             doubles on each error in a row and resets on good data; pass 2 reads
#             what pass 1 skipped;
#   trimming  each non-trimmed block read sector by sector from its leading edge
#             up to the first bad sector, then from its trailing edge back; the
#             middle left non-scraped;
#   scraping  every sector of the non-scraped blocks, once (-n: not done);
#   retrying  every bad sector once per pass (-r N).
# Data is written to the image before the map says so, and the image is synced
# before the map is saved: the map never claims bytes the image does not hold.

MAP_NON_TRIED, MAP_NON_TRIMMED, MAP_NON_SCRAPED, MAP_BAD, MAP_FINISHED = "?", "*", "/", "-", "+"
MAP_STATUSES = "?*/-+"                   # less to more processed
MAP_PHASES = "?*/-FG+"                   # the status line's: ddrescue's filling, generating too
PHASE_COPYING, PHASE_TRIMMING, PHASE_SCRAPING, PHASE_RETRYING, PHASE_FINISHED = "?*/-+"
PHASE_NAMES = {PHASE_COPYING: "copying", PHASE_TRIMMING: "trimming", PHASE_SCRAPING: "scraping",
               PHASE_RETRYING: "retrying", PHASE_FINISHED: "finished"}
RESCUE_CLUSTER = 128                     # sectors a copying read asks for (ddrescue's 64 KiB)
RESCUE_SKIP_MIN = 128                    # sectors skipped after a first error (64 KiB)
RESCUE_DEPTH = 32                        # copying requests in flight
RESCUE_SAVE_SECONDS = 5                  # the map is saved at least this often
RESCUE_COPY_TIMEOUT = 5                  # seconds a copying read may take (a disk's retries)
RESCUE_SECTOR_TIMEOUT = 30               # seconds a read of one sector may (SCSI's default)
READ_TIMEOUT_MAX = 3600                  # the most either may be set to


def c_integer(text):
    """A number as C's strtoll with base 0 reads it (as ddrescue does): 0x hex, a leading
    0 octal, else decimal."""
    t = text.lower()
    if t.startswith("0x"):
        return int(t[2:], 16)
    if len(t) > 1 and t.startswith("0"):
        return int(t[1:], 8)
    return int(t, 10)


class RescueMap:
    """The blocks of a rescue as GNU ddrescue's mapfile holds them: [pos, size, status] in
    bytes, contiguous from 0 to `size`, merged where neighbours agree; and the status line's
    current position, phase and pass."""

    def __init__(self, size, blocks=None, pos=0, phase=PHASE_COPYING, passno=1):
        self.size = size
        self.blocks = blocks or [[0, size, MAP_NON_TRIED]]
        self.pos, self.phase, self.passno = pos, phase, passno

    @classmethod
    def parse(cls, text, name, size):
        """A mapfile's text, for a device of `size` bytes; one clear error per fault."""
        def fault(number, what):
            return usage_error("%s, line %d: %s" % (name, number, what))
        status_line, blocks = None, []
        for number, line in enumerate(text.splitlines(), 1):
            words = re.split(r"(?:^|\s)#", line, 1)[0].split()
            if not words:
                continue
            try:
                if status_line is None:
                    if len(words) not in (2, 3) or len(words[1]) != 1 \
                            or words[1] not in MAP_PHASES:
                        raise ValueError("not 'pos status [pass]'")
                    status_line = (c_integer(words[0]), words[1],
                                   int(words[2]) if len(words) == 3 else 1)
                    if status_line[0] < 0 or status_line[2] < 1:
                        raise ValueError("position below 0 or pass below 1")
                    continue
                if len(words) != 3 or len(words[2]) != 1 or words[2] not in MAP_STATUSES:
                    raise ValueError("not 'pos size status' with a status of %s" % MAP_STATUSES)
                pos, length = c_integer(words[0]), c_integer(words[1])
            except ValueError as e:
                raise fault(number, str(e).split(": ")[-1] if "invalid literal" in str(e)
                            else str(e))
            if pos < 0 or length <= 0:
                raise fault(number, "a block needs pos >= 0 and size > 0")
            if pos % SECTOR_SIZE or length % SECTOR_SIZE:
                raise fault(number, "block 0x%X+0x%X is not in whole %d-byte sectors"
                            % (pos, length, SECTOR_SIZE))
            end = blocks[-1][0] + blocks[-1][1] if blocks else 0
            if blocks and pos != end:
                raise fault(number, "block at 0x%X does not start where the one before ends "
                                    "(0x%X)" % (pos, end))
            if not blocks and pos:
                blocks.append([0, pos, MAP_NON_TRIED])
            if pos + length > size and (words[2] == MAP_FINISHED or pos >= size):
                raise fault(number, "block 0x%X+0x%X goes past the end of the device (%d bytes)"
                            % (pos, length, size))
            blocks.append([pos, min(length, size - pos), words[2]])
        if status_line is None:
            raise usage_error("%s: no status line: not a ddrescue mapfile" % name)
        end = blocks[-1][0] + blocks[-1][1] if blocks else 0
        if end < size:
            blocks.append([end, size - end, MAP_NON_TRIED])
        rmap = cls(size, blocks, *status_line)
        rmap.blocks = rmap._merged(rmap.blocks)
        return rmap

    @staticmethod
    def _merged(blocks):
        out = []
        for b in blocks:
            if out and out[-1][2] == b[2]:
                out[-1][1] += b[1]
            elif b[1]:
                out.append(list(b))
        return out

    def set(self, pos, length, status):
        """Mark [pos, pos + length) with status."""
        if length <= 0:
            return
        end = pos + length
        starts = [b[0] for b in self.blocks]
        i = max(0, bisect.bisect_right(starts, pos) - 1)
        j = bisect.bisect_left(starts, end)
        first, last = self.blocks[i], self.blocks[j - 1]
        pieces = [[first[0], pos - first[0], first[2]], [pos, length, status],
                  [end, last[0] + last[1] - end, last[2]]]
        lo, hi = max(0, i - 1), min(len(self.blocks), j + 1)
        self.blocks[lo:hi] = self._merged(self.blocks[lo:i] + pieces + self.blocks[j:hi])

    def areas(self, statuses, start=0, end=None):
        """[(pos, length, status)] of the blocks with one of `statuses`, cut to [start, end)."""
        end = self.size if end is None else end
        out = []
        for pos, length, status in self.blocks:
            lo, hi = max(pos, start), min(pos + length, end)
            if status in statuses and lo < hi:
                out.append((lo, hi - lo, status))
        return out

    def totals(self, start=0, end=None):
        """Bytes per status inside [start, end), and the number of bad areas there."""
        bytes_in = dict.fromkeys(MAP_STATUSES, 0)
        areas = self.areas(MAP_STATUSES, start, end)
        for _, length, status in areas:
            bytes_in[status] += length
        return bytes_in, sum(1 for a in areas if a[2] == MAP_BAD)

    def text(self, heading):
        """The mapfile, exactly as GNU ddrescue lays it out, under comment lines `heading`."""
        lines = ["# " + h for h in heading]
        lines.append("# current_pos  current_status  current_pass")
        lines.append("0x%08X     %s               %d" % (self.pos, self.phase, self.passno))
        lines.append("#      pos        size  status")
        lines += ["0x%08X  0x%08X  %s" % tuple(b) for b in self.blocks]
        return "\n".join(lines) + "\n"


def save_durably(path, text):
    """Replace `path` with `text` so that a crash leaves the old file or the new one."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AreaCursor:
    """Walks sorted disjoint areas [(lba, count)] in clusters, forwards or backwards, and can
    jump ahead (a skip after an error)."""

    def __init__(self, areas, reverse):
        self.areas, self.reverse = list(reversed(areas)) if reverse else list(areas), reverse
        self.i = 0
        self.at = (self.areas[0][0] + self.areas[0][1] if reverse else self.areas[0][0]) \
            if self.areas else 0

    def next(self, cluster):
        while self.i < len(self.areas):
            lba, count = self.areas[self.i]
            if self.reverse and self.at > lba:
                n = min(cluster, self.at - lba)
                self.at -= n
                return self.at, n
            if not self.reverse and self.at < lba + count:
                n = min(cluster, lba + count - self.at)
                self.at += n
                return self.at - n, n
            self.i += 1
            if self.i < len(self.areas):
                lba, count = self.areas[self.i]
                self.at = lba + count if self.reverse else lba
        return None

    def skip(self, sectors):
        self.at = self.at - sectors if self.reverse else self.at + sectors


class Rescuer:
    """The phases over an engine, into an image (a file descriptor) and a RescueMap whose
    positions are the image's; `save()` is called at least every RESCUE_SAVE_SECONDS and
    `report(rescuer)` after every poll.  `timeouts` (seconds): how long a read of copying,
    and one of the later phases' single sectors, may go unanswered before it is sent again
    (Engine.be_patient)."""

    def __init__(self, engine, image_fd, rmap, start, end, save, report=lambda r: None,
                 reverse=False, scrape=True, retries=0, clock=time.monotonic,
                 timeouts=(RESCUE_COPY_TIMEOUT, RESCUE_SECTOR_TIMEOUT)):
        self.engine, self.fd, self.map = engine, image_fd, rmap
        self.timeouts = timeouts
        self.start, self.end = start, end                 # the domain, in sectors
        self.save, self.report, self.clock = save, report, clock
        self.reverse, self.scrape, self.retries = reverse, scrape, retries
        self.inflight = {}                                # rid -> (lba, count, buffer)
        self.saved_at = self.last_good = clock()
        self.errors_in_a_row = 0
        self.read_bytes = 0

    def run(self):
        passes = ((PHASE_COPYING, 1, True), (PHASE_COPYING, 2, False))
        if self.map.phase == PHASE_COPYING and self.map.passno == 2:
            passes = passes[1:]                           # resumed in pass 2
        for phase, passno, skipping in passes:
            self._copy(passno, skipping)
        self._trim()
        if self.scrape:
            self._each_sector(PHASE_SCRAPING, 1, MAP_NON_SCRAPED)
        for passno in range(1, self.retries + 1):
            self._each_sector(PHASE_RETRYING, passno, MAP_BAD)
        self._enter(PHASE_FINISHED, 1, self.start * SECTOR_SIZE)

    def _enter(self, phase, passno, pos):
        self.map.phase, self.map.passno, self.map.pos = phase, passno, pos
        if phase == PHASE_COPYING:            # a lost frame among answered ones: sent again soon
            self.engine.be_patient(int(self.timeouts[0] * 1e6))
        else:                                 # a sector is read alone because it may be bad
            self.engine.be_patient(*[int(self.timeouts[1] * 1e6)] * 2)

    def _domain_areas(self, statuses):
        return [(pos // SECTOR_SIZE, length // SECTOR_SIZE) for pos, length, _ in
                self.map.areas(statuses, self.start * SECTOR_SIZE, self.end * SECTOR_SIZE)]

    def _copy(self, passno, skipping):
        areas = self._domain_areas(MAP_NON_TRIED)
        if not areas:
            return
        self._enter(PHASE_COPYING, passno, 0)
        cursor = AreaCursor(areas, self.reverse)
        skip, limit = RESCUE_SKIP_MIN, max(RESCUE_SKIP_MIN, (self.end - self.start) // 100)
        while self._keep_busy(cursor, RESCUE_CLUSTER, RESCUE_DEPTH):
            for lba, count, bad in self._collect():
                for bad_lba, bad_count, _ in bad:
                    self.map.set(bad_lba * SECTOR_SIZE, bad_count * SECTOR_SIZE,
                                 MAP_NON_TRIMMED if bad_count > 1 else MAP_BAD)
                if bad and skipping:
                    cursor.skip(skip)                     # the skipped part stays non-tried
                    skip = min(limit, skip * 2)
                elif not bad:
                    skip = RESCUE_SKIP_MIN

    def _trim(self):
        """Both edges of every non-trimmed block, all blocks at once, a sector at a time each."""
        blocks = self._domain_areas(MAP_NON_TRIMMED)
        if not blocks:
            return
        self._enter(PHASE_TRIMMING, 1, blocks[0][0] * SECTOR_SIZE)
        # per block [next sector from the front, next from the back (exclusive), direction:
        # 1 forwards, -1 backwards, 0 done]; one read in flight at a time per block
        edges = [[lba, lba + count, 1] for lba, count in blocks]
        asked, busy = {}, set()                           # lba -> its block's edge; their ids
        while edges:
            for edge in edges:
                if edge[2] and edge[0] < edge[1] and id(edge) not in busy:
                    lba = edge[0] if edge[2] > 0 else edge[1] - 1
                    asked[lba] = edge
                    busy.add(id(edge))
                    self._submit(lba, 1)
            for lba, _, bad in self._collect() if self.inflight else ():
                edge = asked.pop(lba)
                busy.discard(id(edge))
                if edge[2] > 0:
                    edge[0] += 1
                    edge[2] = -1 if bad else 1            # then from the trailing edge
                else:
                    edge[1] -= 1
                    edge[2] = 0 if bad else -1
                if bad:
                    self.map.set(lba * SECTOR_SIZE, SECTOR_SIZE, MAP_BAD)
            for edge in [e for e in edges if (e[2] == 0 or e[0] >= e[1])
                         and id(e) not in busy]:
                edges.remove(edge)                        # the middle is left for scraping
                self.map.set(edge[0] * SECTOR_SIZE, (edge[1] - edge[0]) * SECTOR_SIZE,
                             MAP_NON_SCRAPED)

    def _each_sector(self, phase, passno, status):
        """Every sector of the blocks with `status` once, many at once (scraping, retrying)."""
        areas = self._domain_areas(status)
        if not areas:
            return
        self._enter(phase, passno, areas[0][0] * SECTOR_SIZE)
        cursor = AreaCursor(areas, self.reverse)
        depth = max(RESCUE_DEPTH, self.engine.window * len(self.engine.policy))
        while self._keep_busy(cursor, 1, depth):
            for lba, _, bad in self._collect():
                if bad:
                    self.map.set(lba * SECTOR_SIZE, SECTOR_SIZE, MAP_BAD)

    def _keep_busy(self, cursor, size, depth):
        """Reads of `size` sectors from the cursor until `depth` are in flight; False once
        none are."""
        while len(self.inflight) < depth:
            chunk = cursor.next(size)
            if chunk is None:
                break
            self._submit(*chunk)
            self.map.pos = chunk[0] * SECTOR_SIZE
        return bool(self.inflight)

    def _submit(self, lba, count):
        buf = bytearray(count * SECTOR_SIZE)
        self.inflight[self.engine.submit(OP_READ, lba, count, buf)] = (lba, count, buf)

    def _collect(self):
        """Poll once; for each finished read write what it got, mark it rescued, and yield
        (lba, count, [(lba, count, status) of what failed])."""
        finished = []
        for rid, status in self.engine.poll(20000):
            lba, count, buf = self.inflight.pop(rid)
            if status and self.engine.dead:
                raise AoeError(self.engine.dead)
            bad = (self.engine.failed_frames(rid) or [(lba, count, status)]) if status else []
            at = lba
            for bad_lba, bad_count, _ in bad + [(lba + count, 0, 0)]:
                if bad_lba > at:                          # the good run before it
                    data = memoryview(buf)[(at - lba) * SECTOR_SIZE:(bad_lba - lba) * SECTOR_SIZE]
                    os.pwrite(self.fd, data, at * SECTOR_SIZE)
                    self.map.set(at * SECTOR_SIZE, len(data), MAP_FINISHED)
                    self.read_bytes += len(data)
                    self.last_good = self.clock()
                at = max(at, bad_lba + bad_count)
            finished.append((lba, count, bad))
        if self.clock() - self.saved_at >= RESCUE_SAVE_SECONDS:
            self.save()
            self.saved_at = self.clock()
        self.report(self)
        return finished


# =============================================================================
# Commands: one function per verb; human output, or JSON with --json
# =============================================================================

def emit_json(data):
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def human_size(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (nbytes, unit)
        nbytes /= 1024.0


def parse_size(text):
    """'4096', '4k', '1M', '2G' (powers of 1024) -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = (text.strip().lower().rstrip("ib").rstrip("b")
         if text[-2:].lower() in ("ib", "kb", "mb", "gb") else text.strip().lower())
    mult = units.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in units else t
    if not digits.isdigit():
        raise usage_error("%r is not a size (e.g. 4096, 4k, 1M, 2G)" % text)
    return int(digits) * mult


def sector_aligned(nbytes, what):
    if nbytes % SECTOR_SIZE:
        raise usage_error("%s %d is not a multiple of %d bytes" % (what, nbytes, SECTOR_SIZE))
    return nbytes // SECTOR_SIZE


class Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total, label, enabled=None):
        self.total, self.label = total, label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, nbytes):
        self.done += nbytes
        t = time.monotonic()
        if self.enabled and (t - self.last > 0.2 or self.done >= self.total):
            self.last = t
            rate = self.done / max(t - self.start, 1e-6)
            pct = 100.0 * self.done / self.total if self.total else 100.0
            eta = (self.total - self.done) / rate if rate > 0 else 0
            bar = "#" * int(pct / 5)
            sys.stderr.write("\r%s [%-20s] %5.1f%% %s/%s %6.1f MB/s ETA %d:%02d "
                             % (self.label, bar, pct, human_size(self.done), human_size(self.total),
                                rate / 1e6, eta // 60, eta % 60))
            sys.stderr.flush()

    def finish(self):
        if self.enabled:
            sys.stderr.write("\n")
        return time.monotonic() - self.start


def open_control(args):
    return Control(open_ports(iflist_from(args.iface)), args.verbose)


def report_drops(args, control):
    if args.verbose and control.drops:
        sys.stderr.write("dropped frames: %s\n" % control.drops.describe())


def listing_status(args, control, found):
    """End of a listing command: dropped frames with -v; exit 1 when nothing answered."""
    report_drops(args, control)
    if not found:
        sys.stderr.write("%s: no AoE target answered on %s\n"
                         % (PROG, ", ".join(p.name for p in control.ports)))
        return EXIT_FAIL
    return EXIT_OK


def cmd_interfaces(args):
    allow = iflist_from(args.iface)
    rows = []
    for ifc in all_interfaces():
        d = ifc.as_dict()
        d["aoe"] = (ifc.name in allow) if allow else (ifc.is_ethernet and ifc.up)
        rows.append(d)
    if args.json:
        emit_json({"allow_list": allow, "interfaces": rows})
        return EXIT_OK
    print("%-16s %-17s %6s %-5s %-8s %s" % ("interface", "mac", "mtu", "state", "payload", "aoe"))
    for d in rows:
        print("%-16s %-17s %6d %-5s %-8s %s"
              % (d["name"], d["mac"], d["mtu"], "up" if d["up"] else "down",
                 d["payload"] if d["ethernet"] else "-", "yes" if d["aoe"] else "no"))
    if allow:
        print("allow-list: %s" % " ".join(allow))
    return EXIT_OK


def _devices_arg(args):
    return [parse_device(d) for d in getattr(args, "devices", None) or []]


def cmd_discover(args):
    control = open_control(args)
    targets = control.discover(args.wait)
    if args.json:
        emit_json([t.as_dict() for t in targets])
    else:
        for t in targets:
            print("%-8s %-18s %-24s buffers %-4d sectors %-3d config %r"
                  % (t.name, ",".join(sorted({p.port.name for p in t.paths})),
                     ",".join(sorted({mac_str(p.mac) for p in t.paths})), t.info.bufcnt,
                     t.info.scnt, t.info.config.decode("utf-8", "replace")))
    return listing_status(args, control, targets)


def aoestat_size(sectors):
    """Size as aoe-stat prints it: GB (10^9 bytes) with three decimals, truncated."""
    millis = sectors * 512000 // 10 ** 9
    return "%d.%03dGB" % divmod(millis, 1000)


def aoestat_line(d, state):
    """aoe-stat's columns, padded as it pads them: device, size, interfaces, payload, state."""
    size = aoestat_size(d["size_bytes"] // SECTOR_SIZE) if "size_bytes" in d else "(NA)"
    return "%10s %15s %10s %-5s %-14s" % (d["device"], size, ",".join(d["interfaces"]) or "(NA)",
                                          d.get("payload", "(NA)"), state)


def stat_row(d):
    """aoe-stat's columns; then, for an attached device, its block device and daemon."""
    row = aoestat_line(d, d["state"])
    a = d.get("attached")
    if a:
        row += " %s (%s) %s" % (a["block_device"], a["backend"],
                                "pid %d" % a["pid"] if a["pid"] else "no daemon")
    return row.rstrip()


def with_attachments(rows, devices):
    """Stat rows with each attached device's block device and state; attached devices
    whose target did not answer get a row of their own."""
    by_name = {r["device"]: r for r in rows}
    for a in Attachment.all():
        if devices and parse_device(a.device) not in devices:
            continue
        row = by_name.get(a.device)
        if row is None:
            row = {"device": a.device, "size_bytes": a.sectors * SECTOR_SIZE, "interfaces": [],
                   "payload": "-"}
            rows.append(row)
        row["attached"] = a.as_dict()
        row["state"] = a.status
    return rows


def cmd_stat(args):
    control = open_control(args)
    devices = _devices_arg(args)
    targets = find_targets(control, devices, args.wait)
    answered = [t.as_dict() for t in targets]
    rows = with_attachments(list(answered), devices)
    shown = rows if args.all else [r for r in rows if r["state"] != STATE_UNRESPONSIVE]
    if args.json:
        emit_json(shown)
    else:
        for d in shown:
            print(stat_row(d))
        hidden = len(rows) - len(shown)
        if hidden:
            sys.stderr.write("%d more device(s) answered discovery but not "
                             "IDENTIFY; -a shows them\n" % hidden)
    return listing_status(args, control, rows)


def cmd_ping(args):
    shelf, slot = args.shelf, args.slot
    control = Control(open_ports([args.interface]), args.verbose)
    deadline = time.monotonic() + args.timeout
    t0 = time.monotonic()
    answers = control.query_config(shelf, slot, wait=args.timeout, first_only=True)
    answers = [a for a in answers if a[2] is not None]
    if not answers:
        report_drops(args, control)
        raise AoeError("e%d.%d: no answer on %s within %g s"
                       % (shelf, slot, args.interface, args.timeout))
    port, frame, info = answers[0]
    rtt = (time.monotonic() - t0) * 1000
    target = Target(frame.shelf, frame.slot, info)
    target.add_path(port, frame.src)
    answer = pack_header(frame.dst, frame.src, frame.shelf, frame.slot, frame.command, frame.tag,
                         frame.flags, frame.error) + bytes(frame.body)
    result = {"device": target.name, "interface": port.name, "mac": mac_str(frame.src),
              "rtt_ms": round(rtt, 3), "buffers": info.bufcnt, "fwver": "0x%04x" % info.fwver,
              "sectors": info.scnt, "config": info.config.decode("utf-8", "replace"),
              "answer": pad_frame(answer).hex()}
    if args.identify or args.identify_hex:
        remaining = max(0.1, deadline - time.monotonic())
        control.identify([target], timeout=remaining / QUERY_TRIES)
        if target.identify is None:
            raise AoeError("%s: %s" % (target.name, target.identify_error))
        result["identify"] = target.identify.as_dict()
        result["identify"]["raw"] = struct.pack("<256H", *target.identify.words).hex()
    if args.json:
        emit_json(result)
    else:
        print("%s answered on %s from %s in %.3f ms"
              % (target.name, port.name, mac_str(frame.src), rtt))
        if args.verbose:
            print("buffers %d, firmware 0x%04x, sectors %d, config %r"
                  % (info.bufcnt, info.fwver, info.scnt, result["config"]))
        if args.identify_hex:
            raw = struct.pack("<256H", *target.identify.words)
            for i in range(0, SECTOR_SIZE, 16):
                print(" ".join("%02x" % b for b in raw[i:i + 16]))
        elif args.identify:
            ident = target.identify
            print("device identify fields:")
            print("serial_number: %s" % ident.serial)
            print("firmware_rev: %s" % ident.firmware)
            print("model: %s" % ident.model)
            print("lba48: %s" % ("yes" if ident.lba48 else "no"))
            print("sectors: %d (%s)" % (ident.sectors, human_size(ident.sectors * SECTOR_SIZE)))
    report_drops(args, control)
    return EXIT_OK


def _target_args(words):
    """cfg's positional words: [eX.Y | SHELF SLOT] [IFACE ...] -> (shelf, slot, ifaces)."""
    words = list(words)
    shelf, slot = AOE_SHELF_ANY, AOE_SLOT_ANY
    if words and (words[0][:1] in "eE" and "." in words[0]
                  or "." in words[0] and words[0][0].isdigit()):
        shelf, slot = parse_device(words.pop(0))
    elif len(words) >= 2 and words[0].isdigit() and words[1].isdigit():
        shelf, slot = parse_device("%s.%s" % (words[0], words[1]))
        words = words[2:]
    return shelf, slot, words


def cmd_cfg(args):
    shelf, slot, ifaces = _target_args(args.target)
    ccmd = CCMD_NAMES[args.command]
    config = args.string.encode("utf-8") if args.string is not None else b""
    if ccmd in (AOECCMD_SET, AOECCMD_FSET) and args.string is None:
        raise usage_error("cfg -c %s needs the new string: -s STRING" % args.command)
    control = Control(open_ports(ifaces or iflist_from(args.iface)), args.verbose)
    one = shelf != AOE_SHELF_ANY and slot != AOE_SLOT_ANY
    if args.mac:
        answers = _cfg_unicast(control, parse_mac(args.mac), shelf, slot, ccmd, config,
                               args.timeout)
    else:
        answers = control.query_config(shelf, slot, ccmd, config, wait=args.timeout, first_only=one)
    results, failed = [], False
    for port, frame, info in sorted(answers, key=lambda a: (a[1].shelf, a[1].slot)):
        r = {"device": device_name(frame.shelf, frame.slot), "interface": port.name,
             "mac": mac_str(frame.src)}
        if frame.is_error:
            r["error"] = frame.error_text()
            failed = True
        else:
            r["config"] = info.config.decode("utf-8", "replace")
        results.append(r)
    if args.json:
        emit_json(results)
    else:
        for r in results:
            text = r.get("config") if "error" not in r else "error: " + r["error"]
            print(text if one else "%s\t%s" % (r["device"], text))
    report_drops(args, control)
    if not results:
        where = ", ".join(p.name for p in control.ports)
        if ccmd in (AOECCMD_TEST, AOECCMD_PTEST):
            what = "%s does not match" % device_name(shelf, slot) if one else "no target matched"
        else:
            what = "%s: no answer" % device_name(shelf, slot) if one else "no AoE target answered"
        sys.stderr.write("%s: %s on %s\n" % (PROG, what, where))
        return EXIT_FAIL
    if failed:
        for r in results:
            if "error" in r:
                sys.stderr.write("%s: %s: %s\n" % (PROG, r["device"], r["error"]))
        return EXIT_FAIL
    return EXIT_OK


def _cfg_unicast(control, mac, shelf, slot, ccmd, config, timeout):
    request = ConfigInfo(ccmd=ccmd, config=config)
    answers = []
    for port in control.ports:
        def build(src, dst, tag, port=port):
            return pack_cfg(dst, src, shelf, slot, tag, request)
        frame = control.unicast(Path(port, mac), shelf, slot, build, AOECMD_CFG, 1, timeout)
        if frame is not None:
            answers.append((port, frame, None if frame.is_error else parse_cfg(frame)))
            break
    return answers


def _one_target(args):
    control = open_control(args)
    shelf, slot = parse_device(args.device)
    targets = control.discover(args.wait, shelf, slot)
    if not targets:
        raise AoeError("%s: no answer on %s (see '%s discover')"
                       % (device_name(shelf, slot), ", ".join(p.name for p in control.ports), PROG))
    return control, targets[0]


def _control_exchange(control, target, command, build):
    frame = control.unicast(target.paths[0], target.shelf, target.slot, build, command)
    if frame is None:
        raise AoeError("%s: no answer from %s" % (target.name, target.paths[0]))
    if frame.is_error:
        raise AoeError("%s: %s" % (target.name, frame.error_text()))
    return frame


def cmd_mask(args):
    control, target = _one_target(args)
    directives = ([(DCMD_ADD, parse_mac(m)) for m in args.add]
                  + [(DCMD_DELETE, parse_mac(m)) for m in args.delete])
    request = MaskInfo(MCMD_EDIT if directives else MCMD_READ, 0, directives)
    frame = _control_exchange(control, target, AOECMD_MASK,
                              lambda src, dst, tag: pack_mask(dst, src, target.shelf, target.slot,
                                                              tag, request))
    info = parse_mask(frame)
    macs = [mac_str(m) for _, m in info.directives]
    if args.json:
        emit_json({"device": target.name, "masks": macs, "error": MERROR_NAMES.get(info.merror)})
    else:
        print("%s mask list: %s"
              % (target.name, " ".join(macs) if macs else "(empty: every initiator allowed)"))
    ours = {p.port.mac for p in target.paths}
    if info.directives and not ours & {m for _, m in info.directives}:
        sys.stderr.write("%s: warning: this host (%s) is not on the list, so %s will "
                         "no longer answer it\n"
                         % (PROG, " ".join(sorted(mac_str(m) for m in ours)), target.name))
    if info.merror:
        raise AoeError("%s: mask edit failed: %s"
                       % (target.name, MERROR_NAMES.get(info.merror, info.merror)))
    return EXIT_OK


def cmd_reserve(args):
    control, target = _one_target(args)
    ours = sorted({p.port.mac for p in target.paths})
    if args.release:
        request = ReserveInfo(RCMD_FORCE if args.force else RCMD_SET, [])
    elif args.set is not None:
        macs = [parse_mac(m) for m in args.set] or ours
        request = ReserveInfo(RCMD_FORCE if args.force else RCMD_SET, macs)
    else:
        request = ReserveInfo(RCMD_READ)
    frame = control.unicast(target.paths[0], target.shelf, target.slot,
                            lambda src, dst, tag: pack_reserve(dst, src, target.shelf, target.slot,
                                                               tag, request),
                            AOECMD_RESERVE)
    if frame is None:
        raise AoeError("%s: no answer from %s" % (target.name, target.paths[0]))
    if frame.is_error:
        hint = (" (another initiator holds it; --force takes it over)"
                if frame.error == AOEERR_RESERVED else "")
        raise AoeError("%s: %s%s" % (target.name, frame.error_text(), hint))
    macs = [mac_str(m) for m in parse_reserve(frame).macs]
    if args.json:
        emit_json({"device": target.name, "reserved_for": macs})
    else:
        print("%s reserved for: %s"
              % (target.name, " ".join(macs) if macs else "(nobody: released)"))
    return EXIT_OK


def probe_path(control, target, path, sectors):
    """Does a read of `sectors` sectors come back whole over this path?"""
    req = AtaFields(AOEAFL_EXT if target.identify and target.identify.lba48 else 0, 0, sectors,
                    ATA_CMD_PIO_READ_EXT if target.identify and target.identify.lba48
                    else ATA_CMD_PIO_READ, 0)
    frame = control.ata(target, req, path, tries=2, timeout=0.5)
    if frame is None or frame.is_error:
        return False
    try:
        return len(parse_ata(frame).data) >= sectors * SECTOR_SIZE
    except FrameError:
        return False


def cmd_sancheck(args):
    control = open_control(args)
    targets = find_targets(control, _devices_arg(args), args.wait)
    report, problems = [], 0
    for t in targets:
        advice, checks = [], []
        mtus = sorted({p.port.ifc.mtu for p in t.paths})
        want = t.info.scnt or DEFAULT_SECTORS_PER_FRAME
        for p in t.paths:
            fits = frame_sectors(p.port.ifc.mtu)
            works = None
            if t.identify is not None:
                n = min(fits, want)
                works = n
                while n > 0 and not probe_path(control, t, p, n):
                    n -= 1
                    works = n
            checks.append({"interface": p.port.name, "mac": mac_str(p.mac), "mtu": p.port.ifc.mtu,
                           "mtu_sectors": fits, "path_sectors": works})
            if fits < want:
                need = want * SECTOR_SIZE + ATA_HDR_LEN - ETH_HLEN
                advice.append("%s: MTU %d but %s needs %d for %d-sector frames "
                              "(ip link set %s mtu %d)"
                              % (p.port.name, p.port.ifc.mtu, t.name, need, want, p.port.name,
                                 need))
            if works is not None and works < min(fits, want):
                advice.append("%s -> %s: only %d-sector frames get through (MTU %d says "
                              "%d): check the switch and the target's MTU"
                              % (p.port.name, mac_str(p.mac), works, p.port.ifc.mtu,
                                 min(fits, want)))
        if len(mtus) > 1:
            advice.append("%s: paths have different MTUs %s; every path runs at the smallest"
                          % (t.name, "/".join(map(str, mtus))))
        if t.identify is None:
            advice.append("%s: %s" % (t.name, t.identify_error))
        problems += len(advice)
        report.append({"device": t.name, "macs": len({p.mac for p in t.paths}),
                       "payload": t.sectors_per_frame * SECTOR_SIZE,
                       "interfaces": sorted({p.port.name for p in t.paths}), "paths": checks,
                       "advice": advice})
    if args.json:
        emit_json(report)
    else:
        print("%-10s %-5s %-8s %s" % ("device", "macs", "payload", "local interfaces"))
        for r in report:
            print("%-10s %-5d %-8d %s"
                  % (r["device"], r["macs"], r["payload"], " ".join(r["interfaces"])))
            for line in r["advice"]:
                print("    " + line)
    return listing_status(args, control, targets) or (EXIT_FAIL if problems else EXIT_OK)


def cmd_version(args):
    helper = load_helper()
    info = {"version": __version__, "python": sys.version.split()[0],
            "helper": "built" if helper else "not built (pure-Python data path; run build_ffi.py)"}
    if args.json:
        emit_json(info)
    else:
        print("%s %s (python %s, helper %s)"
              % (PROG, info["version"], info["python"], info["helper"]))
    return EXIT_OK


STREAM_CHUNK = 1 << 20           # bytes per request when streaming an image
STREAM_DEPTH = 8                 # requests in flight when streaming
STREAM_QUEUED = 8                # more buffers, with the file thread or waiting for it


class FileThread:
    """The file side of a stream, in a thread of its own so that frames keep
    moving while the file system works (os.write and os.readv let go of the
    GIL): work(view, lba) runs for each buffer handed over, in order, and
    each comes back with work's result."""

    def __init__(self, work):
        self.work = work
        self.todo, self.finished = queue.Queue(), queue.Queue()
        self.error = None
        self.thread = threading.Thread(target=self._run, name="file", daemon=True)
        self.thread.start()

    def _run(self):
        for item in iter(self.todo.get, None):
            i, view, lba = item
            try:
                result = self.work(view, lba)
            except BaseException as e:            # raised again in the stream's thread
                self.error = e
                self.finished.put(None)
                return
            self.finished.put((i, view, lba, result))

    def give(self, i, view, lba):
        self.todo.put((i, view, lba))

    def take(self, wait):
        """The next buffer done, as (index, view, lba, result), or None if there is none
        within `wait` seconds."""
        try:
            item = self.finished.get(timeout=wait) if wait else self.finished.get_nowait()
        except queue.Empty:
            return None
        if item is None:
            raise self.error
        return item

    def close(self):
        self.todo.put(None)
        self.thread.join()


def stream(engine, op, lba, nsect, file_work, progress=None, fix_tail=None):
    """Move `nsect` sectors from `lba` through a ring of buffers, requests in flight
    together and in order.  The file side runs in a FileThread: file_work(view, lba)
    takes a buffer after a read, or fills one before a write and returns how many
    bytes it put there; fix_tail(view, lba, got) completes a write buffer filled
    short (in this thread, as it may read the target).  Memory stays flat whatever
    the size.  A read stops at the first sector the target fails, what comes before it
    handed to the file side, and raises an AoeError naming the sectors."""
    chunk = STREAM_CHUNK // SECTOR_SIZE
    buffers = [memoryview(bytearray(STREAM_CHUNK)) for _ in range(STREAM_DEPTH + STREAM_QUEUED)]
    free = collections.deque(range(len(buffers)))
    ready = collections.deque()                  # (index, view, lba) to send
    order, inflight, finished = collections.deque(), {}, set()
    failures = {}                                # rid -> (sectors done before the bad, message)
    with_file = 0                                # buffers the file thread holds
    next_lba, end = lba, lba + nsect
    side = FileThread(file_work)
    try:
        while next_lba < end or ready or order or with_file:
            while free and next_lba < end:
                i = free.popleft()
                n = min(chunk, end - next_lba)
                if op == OP_WRITE:
                    side.give(i, buffers[i][:n * SECTOR_SIZE], next_lba)
                    with_file += 1
                else:
                    ready.append((i, buffers[i][:n * SECTOR_SIZE], next_lba))
                next_lba += n
            wait = 0.2 if not order and not ready else 0
            while with_file:
                item = side.take(wait)
                if item is None:
                    break
                wait, with_file = 0, with_file - 1
                i, view, at, got = item
                if op == OP_READ:
                    free.append(i)
                    continue
                if got < len(view):
                    fix_tail(view, at, got)
                ready.append((i, view, at))
            while ready and len(order) < STREAM_DEPTH:
                i, view, at = ready.popleft()
                rid = engine.submit(op, at, len(view) // SECTOR_SIZE, view)
                inflight[rid] = (i, view, at)
                order.append(rid)
            if not order:
                continue
            for rid, status in engine.poll(50000):
                if status:
                    _, view, at = inflight[rid]
                    if op != OP_READ or engine.dead:
                        raise AoeError(engine.error_text(op, at, len(view) // SECTOR_SIZE,
                                                         status))
                    failures[rid] = read_failure(engine, at, len(view) // SECTOR_SIZE, status,
                                                 engine.failed_frames(rid))
                    end = next_lba                # no more requests; the earlier ones go on
                    ready.clear()
                finished.add(rid)
            while order and order[0] in finished:
                rid = order.popleft()
                finished.discard(rid)
                i, view, at = inflight.pop(rid)
                if rid in failures:               # every request before it is in the file
                    good, message = failures[rid]
                    if good:
                        side.give(i, view[:good * SECTOR_SIZE], at)
                    raise AoeError(message)
                if progress is not None:
                    progress.update(len(view))
                if op == OP_READ:
                    side.give(i, view, at)
                    with_file += 1
                else:
                    free.append(i)
    finally:
        side.close()


def read_failure(engine, lba, count, status, failed_frames):
    """(sectors of a failed read that came before its first failed frame, what to say)."""
    bad_lba, bad_count, status = failed_frames[0] if failed_frames else (lba, count, status)
    return bad_lba - lba, ("%s: cannot read sectors %d-%d: %s; what came before them is kept; "
                           "to image past unreadable sectors use 'aoe.py rescue'"
                           % (engine.target.name, bad_lba, bad_lba + bad_count - 1,
                              status_text(status)))


def make_engine(args, target):
    helper = None if args.no_helper else load_helper()
    return Engine(target, deadsecs=args.deadsecs, maxout=args.maxout, helper=helper)


def io_range(args, target):
    """--offset/--length in bytes -> (first sector, sector count), checked against the device."""
    size = target.sectors * SECTOR_SIZE
    offset = parse_size(args.offset) if args.offset else 0
    sector_aligned(offset, "--offset")
    if offset >= size:
        raise usage_error("--offset %d is past the end of %s (%d bytes)"
                          % (offset, target.name, size))
    length = parse_size(args.length) if args.length else size - offset
    sector_aligned(length, "--length")
    if offset + length > size:
        raise usage_error("%s has %d bytes; offset %d + length %d goes past its end"
                          % (target.name, size, offset, length))
    return offset // SECTOR_SIZE, length // SECTOR_SIZE


def summary(target, engine, verb, nbytes, seconds):
    rate = nbytes / max(seconds, 1e-9) / 1e6
    path = "pure Python" if engine.compiled is None else "helper"
    return ("%s %s %s in %.2f s (%.1f MB/s, %s)"
            % (verb, human_size(nbytes), target.name, seconds, rate, path))


def cmd_read(args):
    control = open_control(args)
    target = find_target(control, args.device, args.wait)
    first, count = io_range(args, target)
    hasher = hashlib.new(args.checksum) if args.checksum else None
    if args.output == "-":
        if args.resume:
            raise usage_error("--resume needs an output file, not standard output")
        out = sys.stdout.buffer
    else:
        try:
            out = open(args.output, "r+b" if args.resume and os.path.exists(args.output) else "wb")
        except OSError as e:
            raise usage_error("%s: cannot open for writing: %s" % (args.output, e.strerror))
        if args.resume:
            have = min(os.fstat(out.fileno()).st_size // SECTOR_SIZE, count)
            out.truncate(have * SECTOR_SIZE)
            if hasher:
                out.seek(0)
                for block in iter(lambda: out.read(STREAM_CHUNK), b""):
                    hasher.update(block)
            out.seek(have * SECTOR_SIZE)
            first, count = first + have, count - have
            if have:
                sys.stderr.write("resuming %s at byte %d\n" % (args.output, have * SECTOR_SIZE))

    def consume(view, lba):
        out.write(view)
        if hasher:
            hasher.update(view)

    engine = make_engine(args, target)
    progress = Progress(count * SECTOR_SIZE, "read %s" % target.name)
    try:
        stream(engine, OP_READ, first, count, consume, progress)
        out.flush()
    finally:
        seconds = progress.finish()
        engine.close()
        if out is not sys.stdout.buffer:
            out.close()
    if args.verbose or out is not sys.stdout.buffer:
        sys.stderr.write(summary(target, engine, "read", count * SECTOR_SIZE, seconds) + "\n")
    if args.verbose:
        sys.stderr.write(engine.describe())
    if hasher:
        line = "%s  %s\n" % (hasher.hexdigest(), target.name)
        (sys.stderr if out is sys.stdout.buffer else sys.stdout).write(line)
    return EXIT_OK


def find_target_waiting(control, device, wait, patience):
    """find_target, asking again for up to `patience` seconds: a target still working off
    slow reads (a single-threaded vblade on a failing disk) answers nothing meanwhile."""
    deadline, said = time.monotonic() + patience, False
    while True:
        try:
            return find_target(control, device, wait)
        except AoeError:
            if time.monotonic() >= deadline:
                raise
            if not said:
                sys.stderr.write("%s: no answer yet; asking again for up to %d s (--deadsecs)\n"
                                 % (device, patience))
                said = True


def rescue_progress(start_time):
    """A Rescuer's report: ddrescue's figures on one line, twice a second."""
    shown = [0.0]

    def report(rescuer):
        t = time.monotonic()
        if t - shown[0] < 0.5:
            return
        shown[0] = t
        bytes_in, bad_areas = rescuer.map.totals(rescuer.start * SECTOR_SIZE,
                                                 rescuer.end * SECTOR_SIZE)
        m = rescuer.map
        sys.stderr.write("\rrescued %s, non-tried %s, bad areas %d, bad %s, %s pass %d, "
                         "pos 0x%X, %.1f MB/s, last good read %d s ago   "
                         % (human_size(bytes_in[MAP_FINISHED]),
                            human_size(bytes_in[MAP_NON_TRIED]), bad_areas,
                            human_size(bytes_in[MAP_BAD]), PHASE_NAMES[m.phase], m.passno, m.pos,
                            rescuer.read_bytes / max(t - start_time, 1e-6) / 1e6,
                            t - rescuer.last_good))
        sys.stderr.flush()
    return report


def rescue_phase_text(rmap, reverse):
    """The status comment ddrescue writes above the status line."""
    way = "backwards" if reverse else "forwards"
    return {PHASE_COPYING: "Copying non-tried blocks... Pass %d (%s)" % (rmap.passno, way),
            PHASE_TRIMMING: "Trimming failed blocks... (forwards)",
            PHASE_SCRAPING: "Scraping failed blocks... (%s)" % way,
            PHASE_RETRYING: "Retrying bad sectors... Retry %d (%s)" % (rmap.passno, way),
            }.get(rmap.phase, "Finished")


def open_image(path, end_bytes):
    """The image: a regular file, made if missing, never truncated, as long as the domain's
    end at least (sparse where nothing is written), or a block device at least that long."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise usage_error("%s: cannot open for writing: %s" % (path, e.strerror))
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        size = os.lseek(fd, 0, os.SEEK_END)
        if size < end_bytes:
            os.close(fd)
            raise usage_error("%s holds %d bytes; the rescue needs %d" % (path, size, end_bytes))
    elif not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise usage_error("%s is neither a regular file nor a block device" % path)
    elif st.st_size < end_bytes:
        os.ftruncate(fd, end_bytes)              # a hole: unreadable sectors at the end too
    return fd


def cmd_rescue(args):
    try:
        with open(args.mapfile) as f:
            map_text = f.read()
    except FileNotFoundError:
        map_text = None
    except (OSError, UnicodeDecodeError) as e:
        raise usage_error("%s: cannot read: %s" % (args.mapfile, getattr(e, "strerror", e)))
    control = open_control(args)
    target = find_target_waiting(control, args.device, args.wait, args.deadsecs)
    first, count = io_range(args, target)
    size = target.sectors * SECTOR_SIZE
    rmap = (RescueMap(size) if map_text is None
            else RescueMap.parse(map_text, args.mapfile, size))
    fd = open_image(args.image, (first + count) * SECTOR_SIZE)
    engine = make_engine(args, target)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    command_line = " ".join(shlex.quote(a) for a in [PROG] + sys.argv[1:])

    def save():
        os.fsync(fd)                              # the data first, then the map that claims it
        save_durably(args.mapfile, rmap.text([
            "Mapfile. Created by %s version %s" % (PROG, __version__),
            "Command line: " + command_line, "Start time:   " + started,
            "Current time: " + time.strftime("%Y-%m-%d %H:%M:%S"),
            rescue_phase_text(rmap, args.reverse)]))

    t0 = time.monotonic()
    tty = sys.stderr.isatty() and not args.json
    rescuer = Rescuer(engine, fd, rmap, first, first + count, save,
                      rescue_progress(t0) if tty else lambda r: None, args.reverse,
                      not args.no_scrape, args.retry_passes,
                      timeouts=(args.copy_timeout, args.sector_timeout))
    interrupted = False
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        rescuer.run()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            save()
        finally:
            engine.close()
            os.close(fd)
    if tty:
        sys.stderr.write("\n")
    bytes_in, bad_areas = rmap.totals(first * SECTOR_SIZE, (first + count) * SECTOR_SIZE)
    report = {"device": target.name, "image": args.image, "mapfile": args.mapfile,
              "domain": {"offset": first * SECTOR_SIZE, "length": count * SECTOR_SIZE},
              "rescued": bytes_in[MAP_FINISHED], "non_tried": bytes_in[MAP_NON_TRIED],
              "non_trimmed": bytes_in[MAP_NON_TRIMMED],
              "non_scraped": bytes_in[MAP_NON_SCRAPED], "bad": bytes_in[MAP_BAD],
              "bad_areas": bad_areas, "read": rescuer.read_bytes,
              "seconds": round(time.monotonic() - t0, 3), "interrupted": interrupted,
              "finished": rmap.phase == PHASE_FINISHED}
    if args.json:
        emit_json(report)
    else:
        sys.stderr.write("%s: rescued %s of %s, %d bad areas (%s)%s; map in %s\n"
                         % (target.name, human_size(report["rescued"]),
                            human_size(count * SECTOR_SIZE), bad_areas, human_size(report["bad"]),
                            ", interrupted" if interrupted else "", args.mapfile))
    if args.verbose:
        sys.stderr.write(engine.describe())
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if report["rescued"] == count * SECTOR_SIZE else EXIT_FAIL


def confirm(question):
    if not sys.stdin.isatty():
        return False
    sys.stderr.write(question + " [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_write(args):
    try:
        src = open(args.input, "rb")
    except OSError as e:
        raise usage_error("%s: cannot open: %s" % (args.input, e.strerror))
    size = os.fstat(src.fileno()).st_size
    if not os.path.isfile(args.input) or size == 0:
        raise usage_error("%s: write needs a non-empty regular file (its size is checked first)"
                          % args.input)
    control = open_control(args)
    target = find_target(control, args.device, args.wait)
    devsize = target.sectors * SECTOR_SIZE
    offset = parse_size(args.offset) if args.offset else 0
    first = sector_aligned(offset, "--offset")
    if offset + size > devsize:
        raise usage_error("%s is %d bytes but %s has only %d bytes from offset %d"
                          % (args.input, size, target.name, devsize - offset, offset))
    if not args.yes and not confirm("Overwrite %s of %s at offset %d with %s?"
                                    % (human_size(size), target.name, offset, args.input)):
        raise usage_error("not writing to %s: confirm at the prompt, or pass --yes" % target.name)
    engine = make_engine(args, target)
    count = (size + SECTOR_SIZE - 1) // SECTOR_SIZE

    def fill(view, lba):
        got = src.readinto(view)
        while got and got < len(view):
            more = src.readinto(view[got:])
            if not more:
                break
            got += more
        if len(view) - got >= SECTOR_SIZE:
            raise AoeError("%s changed size while being written; %s holds a partial copy"
                           % (args.input, target.name))
        return got

    def keep_tail(view, lba, got):
        """The bytes after the image's last partial sector stay as they are on the target."""
        tail = (got // SECTOR_SIZE) * SECTOR_SIZE
        old = bytearray(SECTOR_SIZE)
        engine.run(OP_READ, lba + tail // SECTOR_SIZE, 1, old)
        view[got:tail + SECTOR_SIZE] = old[got - tail:]

    progress = Progress(size, "write %s" % target.name)
    try:
        stream(engine, OP_WRITE, first, count, fill, progress, keep_tail)
        engine.flush()
    finally:
        seconds = progress.finish()
        engine.close()
        src.close()
    sys.stderr.write(summary(target, engine, "wrote", size, seconds) + ", flushed\n")
    if args.verbose:
        sys.stderr.write(engine.describe())
    return EXIT_OK


def percentile(sorted_values, fraction):
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def bench_one(engine, op, pattern, block, depth, seconds, span, rng):
    """Keep `depth` requests of `block` sectors in flight for `seconds`; returns the figures."""
    buffers = [bytearray(block * SECTOR_SIZE) for _ in range(depth)]
    for b in buffers:
        b[:] = os.urandom(len(b)) if op == OP_WRITE else b
    slots = span // block
    started, latencies = {}, []
    free = collections.deque(range(depth))
    owner = {}
    position = 0
    t0 = time.monotonic()
    stop = t0 + seconds
    while True:
        t = time.monotonic()
        while free and t < stop:
            i = free.popleft()
            if pattern == "seq":
                lba = (position % slots) * block
                position += 1
            else:
                lba = rng.randrange(slots) * block
            rid = engine.submit(op, lba, block, buffers[i])
            started[rid] = time.monotonic()
            owner[rid] = i
        if not started:
            break
        for rid, status in engine.poll(20000):
            if status:
                raise AoeError(engine.error_text(op, 0, block, status))
            latencies.append(time.monotonic() - started.pop(rid))
            free.append(owner.pop(rid))
    elapsed = time.monotonic() - t0
    latencies.sort()
    n = len(latencies)
    return {"test": "%s-%s" % (pattern, ("read", "write")[op]), "block": block * SECTOR_SIZE,
            "depth": depth, "requests": n, "seconds": round(elapsed, 3),
            "mb_per_s": round(n * block * SECTOR_SIZE / elapsed / 1e6, 2),
            "iops": round(n / elapsed, 1),
            "lat_p50_ms": round(percentile(latencies, 0.5) * 1000, 3),
            "lat_p99_ms": round(percentile(latencies, 0.99) * 1000, 3)}


def cmd_bench(args):
    control = open_control(args)
    target = find_target(control, args.device, args.wait)
    block = sector_aligned(parse_size(args.bs), "--bs")
    if block <= 0:
        raise usage_error("--bs must be at least %d bytes" % SECTOR_SIZE)
    span = min(target.sectors,
               sector_aligned(parse_size(args.span), "--span") if args.span else target.sectors)
    if span < block:
        raise usage_error("%s is smaller than one block of %s" % (target.name, args.bs))
    engine = make_engine(args, target)
    rng = random.Random(1)
    ops = [OP_READ] + ([OP_WRITE] if args.write else [])
    results = []
    try:
        for pattern in args.pattern.split(","):
            if pattern not in ("seq", "rand"):
                raise usage_error("--pattern takes seq, rand or seq,rand; not %r" % pattern)
            for op in ops:
                results.append(bench_one(engine, op, pattern, block, args.qd, args.seconds,
                                         span, rng))
    finally:
        engine.close()
    if args.json:
        emit_json({"device": target.name, "helper": engine.compiled is not None,
                   "results": results})
    else:
        print("%-11s %8s %5s %10s %10s %10s %10s"
              % ("test", "block", "depth", "MB/s", "IOPS", "p50 ms", "p99 ms"))
        for r in results:
            print("%-11s %8s %5d %10.1f %10.0f %10.3f %10.3f"
                  % (r["test"], human_size(r["block"]), r["depth"], r["mb_per_s"], r["iops"],
                     r["lat_p50_ms"], r["lat_p99_ms"]))
        print("(%s, %s data path)"
              % (target.name, "pure-Python" if engine.compiled is None else "helper"))
    return EXIT_OK


def attach_options(args):
    return AttachOptions(readonly=args.ro, deadsecs=args.deadsecs, maxout=args.maxout,
                         scheduler=args.scheduler)


def cmd_attach(args):
    if args.watch and not args.all:
        raise usage_error("--watch goes with --all")
    if args.all:
        return attach_all(args)
    if len(args.device) != 1:
        raise usage_error("attach takes one eX.Y, or --all [PATTERN ...]")
    args.device = args.device[0]
    name = device_name(*parse_device(args.device))
    helper = None if args.no_helper else load_helper()
    known = Attachment.load(name)
    if args.upgrade:
        if args.recover:
            raise usage_error("--upgrade and --recover exclude each other")
        if known is None or not known.daemon_alive:
            raise AoeError("%s: no running attach daemon to hand over from (%s)" % (
                name, "none recorded in %s" % RUN_DIR if known is None
                else "pid %d is gone: use --recover" % known.pid))
        if "quiesce" not in (known.features or []):
            raise AoeError("%s (%s) cannot be handed to a new daemon: %s; 'aoe.py detach %s' "
                           "and attach it again"
                           % (name, known.block,
                              "nbd cannot pause a device" if known.backend == "nbd" else
                              "it was attached without ublk's QUIESCE (Linux 6.16 or later)", name))
        backend, why = known.backend, "as attached"
        helper = need_helper("attach --upgrade")
    elif args.recover:
        if known is None:
            raise AoeError("%s: no attached device recorded in %s: nothing to recover"
                           % (name, RUN_DIR))
        if known.daemon_alive:
            raise AoeError("%s is served by pid %d: nothing to recover" % (name, known.pid))
        if not known.recoverable:
            raise AoeError("%s was attached without a way to recover (%s): "
                           "'aoe.py detach %s', then attach it again"
                           % (name,
                              "this kernel's ublk lacks user recovery" if known.backend == "ublk"
                              else "nbd's ioctl interface", name))
        backend, why = known.backend, "as attached"
        if backend == "ublk":
            helper = need_helper("attach --recover of a ublk device")
    else:
        if known is not None:
            if known.daemon_alive:
                raise AoeError("%s is already attached as %s (pid %d); 'aoe.py detach %s' first"
                               % (name, known.block, known.pid, name))
            if known.exists:
                raise AoeError("%s's daemon died and %s waits for it: 'aoe.py attach --recover %s' "
                               "or 'aoe.py detach %s'" % (name, known.block, name, name))
            known.remove()
        backend, why = choose_backend(args.backend, helper)
    control = open_control(args)
    target = find_target(control, args.device, args.wait)
    if args.verbose:
        sys.stderr.write("%s: attaching through %s (%s), %s data path\n"
                         % (name, backend, why, "helper" if helper else "pure-Python"))

    def show(a):
        if args.json:
            return json.dumps(a.as_dict())
        if args.verbose and a.backend == "ublk":
            return attach_summary(a) + "\n%s: ublk %s" % (
                a.device, ", ".join(a.features) or "without optional features")
        return attach_summary(a)
    start = START_UPGRADE if args.upgrade else START_RECOVER if args.recover else START_CREATE
    if args.foreground:
        host = DeviceHost(helper, attach_options(args), log_files=False)
        a = host.attach(target, backend, start)
        close_ports(control.ports)
        print(show(a), flush=True)
        notify_service_manager("READY=1\nSTATUS=%s" % attach_summary(a))
        return host.wait()

    def serve(tell):
        host = DeviceHost(helper, attach_options(args), log_files=True)
        a = host.attach(target, backend, start)
        close_ports(control.ports)
        tell(show(a))
        tell(None)
        return host.wait()
    return run_in_background(log_path(name), serve)


WATCH_INTERVAL = 5.0             # seconds between discoveries of attach --all --watch
WATCH_RETRY = 60                 # seconds before attach --all --watch tries a failed target again


def attach_all(args):
    """attach --all [PATTERN ...]: every target that answers discovery and matches a shell
    pattern (default all), skipping attached ones, served by one daemon process; with
    --recover, instead, every matching device left for attach --recover (its daemon died).
    --watch: serve them in the foreground and keep going, attaching targets as they appear
    (they announce themselves, and every --interval a discovery asks) and taking back
    devices left behind, and, with --flush-down, detaching devices down that long."""
    if args.upgrade or args.foreground:
        raise usage_error("attach --all attaches or recovers devices: no --upgrade or --foreground")
    if args.recover and args.watch:
        raise usage_error("attach --all --watch recovers devices left behind by itself: "
                          "no --recover")
    patterns = args.device or ["*"]
    helper = None if args.no_helper else load_helper()
    backend = choose_backend(args.backend, helper)[0] if not args.recover else None
    control = open_control(args)
    failed, down_since, unanswered = {}, {}, set()

    def due(targets):
        """(target, backend, start) for the matching targets to attach now: new ones unless
        --recover, and those whose device waits for a daemon with --recover or --watch;
        each answered IDENTIFY (one that did not is asked again next round).  Also whether
        any did not."""
        wanted = [t for t in targets if any(fnmatch.fnmatchcase(t.name, p) for p in patterns)]
        if not wanted and not args.watch:
            raise AoeError("no AoE target matched %s" % " ".join(patterns))
        chosen = []
        for t in wanted:
            a = Attachment.load(t.name)
            if time.monotonic() < failed.get(t.name, 0):
                continue
            if a is None or not (a.daemon_alive or a.exists):
                if not args.recover:
                    chosen.append((t, backend, START_CREATE))
            elif not a.daemon_alive and a.recoverable and (
                    args.recover or args.watch and a.state != STATE_HANDED_OVER):  # one takes it
                chosen.append((t, a.backend, START_RECOVER))
        if args.recover and not chosen:
            raise AoeError("no device matching %s waits for attach --recover" % " ".join(patterns))
        control.identify([t for t, _, _ in chosen])
        for t, _, _ in chosen:
            if t.identify is None and t.name not in unanswered:
                sys.stderr.write("%s: %s: %s\n" % (PROG, t.name, t.identify_error))
            (unanswered.add if t.identify is None else unanswered.discard)(t.name)
        answered = [c for c in chosen if c[0].identify is not None]
        return answered, len(answered) < len(chosen)

    def attach_each(host, chosen, tell):
        for t, how, start in chosen:
            try:
                if start == START_RECOVER and how == "ublk" and helper is None:
                    need_helper("attach --recover of a ublk device")
                tell(attach_summary(host.attach(t, how, start)))
                failed.pop(t.name, None)
            except AoeError as e:
                tell(str(e), ok=False)
                failed[t.name] = time.monotonic() + WATCH_RETRY

    chosen, silent = due(control.discover(args.wait))
    if not args.watch:
        if not chosen:
            return EXIT_FAIL if silent else EXIT_OK

        def serve(tell):
            host = DeviceHost(helper, attach_options(args), log_files=True)
            attach_each(host, chosen, tell)
            close_ports(control.ports)
            tell(None)
            return host.wait()
        status = run_in_background(os.path.join(RUN_DIR, ATTACH_ALL_LOG), serve)
        return EXIT_FAIL if silent else status

    host = DeviceHost(helper, attach_options(args), log_files=True)
    while not host.stopping:
        attach_each(host, chosen, tell_here)
        notify_service_manager("READY=1\nSTATUS=watching for %s" % " ".join(patterns))
        if args.flush_down is not None:
            flush_down_devices(patterns, down_since, args.flush_down)
        if host.stopping:
            break
        chosen, _ = due(control.discover(args.interval, announced=True))
    close_ports(control.ports)
    host.stop()
    host.wait()
    return EXIT_OK


def flush_down_devices(patterns, down_since, after):
    """Detach matching devices that have been down (or without a daemon) for `after` s."""
    now = time.monotonic()
    for a in Attachment.all():
        if not any(fnmatch.fnmatchcase(a.device, p) for p in patterns) or \
                a.status not in (STATE_DOWN, STATE_DEAD):
            down_since.pop(a.device, None)
            continue
        if now - down_since.setdefault(a.device, now) >= after:
            problem = detach_attachment(a, False)
            print("%s: %s" % (a.device, problem or "%s removed: down for %d s" % (a.block, after)),
                  flush=True)
            down_since.pop(a.device, None)


DETACH_WAIT = DETACH_DEADSECS + CONTROL_LIMIT + 30   # seconds for a daemon to finish detaching


def detach_attachment(a, force):
    """Stop and delete an attached device, through its daemon if it lives.  Returns an error
    text or None."""
    busy = None if force else device_in_use(a.block, a.pid)
    if busy:
        return "%s (%s) is in use (%s): stop using it first, or --force" % (a.device, a.block, busy)
    if a.daemon_alive:                            # the daemon may serve other devices too
        try:
            ask_daemon(a, VERB_DETACH, wait=DETACH_WAIT)
        except AoeError as e:
            return str(e)
        return None
    problem = BACKEND_CLASSES[a.backend].remove_orphan(a)
    if problem:
        return "%s: %s" % (a.device, problem)
    remove_links(a.device, a.dev)
    a.remove()
    return None


def cmd_detach(args):
    a = Attachment.find(args.device)
    if a is None:
        raise AoeError("%s is not attached (nothing recorded in %s)" % (args.device, RUN_DIR))
    problem = detach_attachment(a, args.force)
    if problem:
        raise AoeError(problem)
    print("%s: %s detached" % (a.device, a.block))
    return EXIT_OK


def cmd_flush(args):
    """Like aoe-flush: remove attached devices that are down (or whose daemon died); -a: all."""
    wanted = {device_name(*parse_device(d)) for d in args.devices}
    chosen = [a for a in Attachment.all()
              if (a.device in wanted if wanted else args.all or a.status in (STATE_DOWN, STATE_DEAD))]
    status = EXIT_OK
    for a in chosen:
        problem = detach_attachment(a, args.force)
        if problem:
            sys.stderr.write("%s: %s\n" % (PROG, problem))
            status = EXIT_FAIL
        else:
            print("%s: %s removed" % (a.device, a.block))
    return status


def cmd_revalidate(args):
    control = open_control(args)
    target = find_target(control, args.device, args.wait)
    a = Attachment.load(target.name)
    if a is None or not a.exists:
        print("%s: %d sectors (%.3fGB); not attached"
              % (target.name, target.sectors, target.sectors * SECTOR_SIZE / 1e9))
        return EXIT_OK
    if target.sectors == a.sectors:
        print("%s: %d sectors, as %s has" % (target.name, target.sectors, a.block))
        return EXIT_OK
    if not a.daemon_alive:
        raise AoeError("%s: %s's daemon is gone: 'aoe.py attach --recover %s' first"
                       % (target.name, a.block, target.name))
    if target.sectors < a.sectors and not args.force:
        busy = device_in_use(a.block, a.pid)
        if busy:
            raise AoeError("%s shrank from %d to %d sectors but %s is %s: refusing to cut what it "
                           "holds (--force to shrink anyway)"
                           % (target.name, a.sectors, target.sectors, a.block, busy))
    print(ask_daemon(a, VERB_RESIZE, sectors=target.sectors))
    return EXIT_OK


class StopFlag:
    """Set by SIGINT/SIGTERM so long-running loops end cleanly."""

    def __init__(self):
        self.set = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.set = True

    def __call__(self):
        return self.set


def warn_if_buffers_overflow(ports, ifc, bufcnt):
    """The buffer count is a promise: that many requests may be outstanding.  Warn
    when the sockets cannot queue that many full-size frames (unprivileged buffer caps)."""
    frame = ifc.mtu + ETH_HLEN
    per_frame = 2 * frame + 512                  # the kernel's size for a queued frame, roughly
    room = sum(p.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for p in ports) // per_frame
    if room < bufcnt:
        sys.stderr.write("serve: %s: the receive buffer holds about %d frames of %d bytes, fewer "
                         "than the %d buffers advertised: use -b %d, or raise net.core.rmem_max\n"
                         % (ifc.name, room, frame, bufcnt, room))


def serve_account(name):
    """Whom serve becomes once it listens (a pwd entry), or None to stay as it is: --user,
    a name or a numeric uid, default nobody when started as root.  Only root can switch,
    so without root --user may name nobody but the current user."""
    root = os.geteuid() == 0
    if name is None and not root:
        return None
    name = "nobody" if name is None else name
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        try:
            account = pwd.getpwuid(int(name))
        except (KeyError, ValueError):
            raise usage_error("--user %s: no such user" % name)
    if not root and account.pw_uid != os.geteuid():
        raise usage_error("--user %s: only root can switch users, and this is uid %d"
                          % (name, os.geteuid()))
    return account if root and account.pw_uid != 0 else None


PR_SET_NO_NEW_PRIVS = 38         # <linux/prctl.h>


def privileges_left(uid, gid):
    """What some thread holds beyond uid and gid (from /proc/self/task/*/status), or None."""
    wanted = {"Uid": [str(uid)] * 4, "Gid": [str(gid)] * 4, "Groups": [], "NoNewPrivs": ["1"]}
    tasks = os.listdir("/proc/self/task")
    for tid in tasks:
        with open("/proc/self/task/%s/status" % tid) as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        for key, value in sorted(fields.items()):
            words = value.split()
            if (key in wanted and words != wanted[key]
                    or key in ("CapPrm", "CapEff", "CapAmb") and int(words[0], 16)):
                return "thread %s has %s %s" % (tid, key, " ".join(words) or "(none)")
    return None if tasks else "no thread in /proc/self/task"


def become(account):
    """Switch to `account` for good: no supplementary groups, its group, then its uid
    (setgid needs the privilege setuid gives up), and no way back, not even through a
    set-user-ID program; raises unless every thread is so.  The C library switches all
    threads, but no_new_privs is per thread: call this before starting any."""
    uid, gid = account.pw_uid, account.pw_gid
    where = "--user %s" % account.pw_name
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, *map(ctypes.c_ulong, (1, 0, 0, 0))):
            code = ctypes.get_errno()
            raise OSError(code, "PR_SET_NO_NEW_PRIVS: " + os.strerror(code))
    except OSError as e:
        raise AoeError("%s: cannot switch to it: %s: refusing to serve" % (where, e.strerror))
    try:
        os.setuid(0)
    except PermissionError:
        try:
            left = privileges_left(uid, gid)
        except OSError as e:
            left = "%s: %s" % (e.filename, e.strerror)
    else:
        left = "setuid(0) still works"
    if left:
        raise AoeError("%s: still privileged after the switch (%s): refusing to serve"
                       % (where, left))


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def cmd_serve(args):
    """Everything serve needs privilege for (its sockets with their buffer sizes and
    fan-out group, the export, the helper) is opened first; then it becomes --user."""
    shelf, slot = parse_device("%s.%s" % (args.shelf, args.slot))
    account = serve_account(args.user)
    ifc = Interface(args.interface)
    if not ifc.up:
        raise usage_error("%s is down: bring it up with 'ip link set %s up'" % (ifc.name, ifc.name))
    length = sector_aligned(parse_size(args.length), "-l") if args.length else None
    export = Export(args.file, args.readonly, args.direct, args.sync,
                    sector_aligned(parse_size(args.offset), "-o") if args.offset else 0, length)
    masks = [parse_mac(m) for m in (args.mask or "").replace(",", " ").split()]
    faults = FaultPlan(args.fault_drop, args.fault_duplicate, args.fault_delay, args.fault_jitter,
                       args.fault_reorder, args.fault_forge, args.fault_seed)
    bad = None
    if args.fault_bad:
        bad = BadSectors(args.fault_bad, BAD_SECTOR_ERRORS[args.fault_bad_error],
                         args.fault_bad_delay)
        if bad.sectors.ends[-1] > export.sectors:
            raise usage_error("--fault-bad: sector %d is past the end of the export (%d sectors)"
                              % (bad.sectors.ends[-1] - 1, export.sectors))
    helper = load_helper()
    why_python = ("fault injection" if faults.active else "no helper" if helper is None
                  else "over %d masks" % SERVE_MASK_MAX if len(masks) > SERVE_MASK_MAX else None)
    ports, why_fewer = fanout_ports(ifc, 1 if why_python else serve_threads())
    target = AoeTarget(shelf, slot, export, ifc.mac, ifc.mtu, args.bufcnt, masks, bad=bad)
    fast = None
    try:
        if not why_python:
            fast = FastServe(helper, target, ports, max(ETH_ZLEN, ifc.mtu + ETH_HLEN))
        path = ("helper, %d thread%s" % (len(ports), "" if len(ports) == 1 else "s") if fast
                else "pure-Python: %s" % why_python)
        if account:
            become(account)
        print("pid %d: %s, %d sectors %s on %s (%s), %d buffers, %d sectors per "
              "frame, %s data path%s, as user %s (uid %d, gid %d)"
              % (os.getpid(), device_name(shelf, slot), export.sectors,
                 "O_RDONLY" if args.readonly else "O_RDWR", ifc.name, mac_str(ifc.mac), args.bufcnt,
                 target.scnt, path,
                 (", FAULT INJECTION ON" if faults.active else "")
                 + (", %d UNREADABLE SECTORS (%s)"
                    % (len(bad.sectors), args.fault_bad_error.upper()) if bad else ""),
                 user_name(os.geteuid()), os.geteuid(), os.getegid()), flush=True)
        if why_fewer:
            sys.stderr.write("serve: one thread only: %s\n" % why_fewer)
        warn_if_buffers_overflow(ports, ifc, args.bufcnt)
        stop = StopFlag()
        if fast:
            fast.run(stop)
        else:
            serve_loop(target, ports[0], faults if faults.active else None, stop)
    finally:
        close_ports(ports)
        export.close()
        if args.verbose:
            sys.stderr.write("served %s; dropped: %s\n"
                             % (dict(target.stats), target.drops.describe()))
    return EXIT_OK


SYSTEMD_DIR = "/etc/systemd/system"
SYSTEMD_UNIT = """[Unit]
Description=%(what)s
Wants=network-online.target remote-fs-pre.target
After=network-online.target
Before=remote-fs-pre.target

[Service]
Type=notify
NotifyAccess=main
ExecStart=%(run)s %(args)s
TimeoutStartSec=120
TimeoutStopSec=120
%(more)s
[Install]
WantedBy=multi-user.target
"""
SYSTEMD_UNITS = {   # file -> (Description, aoe.py's arguments, more [Service] lines)
    "aoe@.service": ("AoE target %i as a block device (aoe.py attach)", "attach --foreground %i",
                     ""),
    # started again after a crash, the watch takes back the devices left behind
    "aoe-all.service": ("Every AoE target as a block device, also those that appear later "
                        "(aoe.py attach --all --watch)", "attach --all --watch",
                        "Restart=on-failure\nRestartSec=5\n"),
}


def cmd_systemd_units(args):
    """Print, or write (--install, --dir), the service units that attach at boot: aoe@eX.Y
    for one device, aoe-all for every target (stopping either detaches its devices)."""
    run = "%s %s" % (sys.executable, os.path.abspath(__file__))
    units = {name: SYSTEMD_UNIT % {"what": what, "run": run, "args": words, "more": more}
             for name, (what, words, more) in SYSTEMD_UNITS.items()}
    if not (args.install or args.dir):
        for name, text in units.items():
            print("# %s\n%s" % (name, text))
        return EXIT_OK
    where = args.dir or SYSTEMD_DIR
    os.makedirs(where, exist_ok=True)
    for name, text in units.items():
        with open(os.path.join(where, name), "w") as f:
            f.write(text)
        print(os.path.join(where, name))
    if args.install and shutil.which("systemctl"):
        subprocess.run(["systemctl", "daemon-reload"])
    return EXIT_OK


# =============================================================================
# Lab and demo: private namespaces with a built-in target (NetLab), and the demo verb
# =============================================================================
#
# NetLab makes two private network namespaces joined by veth pairs and runs
# processes in them; the demo verb serves a sparse image from one and runs
# aoe.py's verbs against it from the other.  The tests and the benchmarks
# (test_aoe.py, bench/run.py) use NetLab too.

class NetLab:
    """Two private network namespaces, 'ini' (initiator) and 'tgt' (target), joined
    by veth pairs; processes started in them.  close() removes everything it made,
    also after Ctrl-C.  Used by demo, the tests and the benchmarks."""

    def __init__(self, mtu=9000, prefix="aoelab"):
        if os.geteuid() != 0:
            raise AoeError("creating network namespaces needs root (sudo python3 %s ...)" % PROG,
                           EXIT_USAGE)
        if not shutil.which("ip"):
            raise AoeError("the 'ip' command is missing: install iproute2", EXIT_USAGE)
        # names stay <= 15 chars
        self.tag = tag = "%s%07x" % (prefix[:6], random.SystemRandom().getrandbits(28))
        self.ini_ns, self.tgt_ns = tag + "i", tag + "t"
        self.ini_if, self.tgt_if = tag + "i", tag + "t"
        self.mtu = mtu
        self.ini_ifs, self.tgt_ifs = [], []
        self.procs = []
        self.made = []
        self.run_dir = tempfile.mkdtemp(prefix="aoe-lab-")
        try:
            for ns in (self.ini_ns, self.tgt_ns):
                self.ip("netns", "add", ns)
                self.made.append(ns)
                self.ip("-n", ns, "link", "set", "lo", "up")
            self.add_link(self.ini_if, self.tgt_if)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def ip(*args):
        r = subprocess.run(("ip",) + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=30)
        if r.returncode:
            raise AoeError("ip %s: %s" % (" ".join(args), r.stderr.strip()))

    def add_link(self, ini_if=None, tgt_if=None):
        """One more veth pair between the namespaces: one more path to the targets."""
        n = len(self.ini_ifs) + 1
        ini_if, tgt_if = ini_if or "%si%d" % (self.tag, n), tgt_if or "%st%d" % (self.tag, n)
        self.ip("link", "add", ini_if, "netns", self.ini_ns, "type", "veth", "peer", "name", tgt_if,
                "netns", self.tgt_ns)
        for ns, ifname in ((self.ini_ns, ini_if), (self.tgt_ns, tgt_if)):
            self.ip("-n", ns, "link", "set", ifname, "mtu", str(self.mtu), "up")
        self.ini_ifs.append(ini_if)
        self.tgt_ifs.append(tgt_if)
        return ini_if, tgt_if

    def mac(self, ns, ifname):
        r = subprocess.run(self.argv(ns, ["cat", os.path.join(SYS_NET, ifname, "address")]),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        return r.stdout.strip()

    def argv(self, ns, args):
        return ["ip", "netns", "exec", ns] + list(args)

    def aoe_argv(self, ns, args):
        return self.argv(ns, [sys.executable, os.path.abspath(__file__)] + list(args))

    def env(self):
        """Commands in the lab use its interfaces, and keep attached devices' records
        and links in its own directories, apart from the host's."""
        return dict(os.environ, AOE_IFLIST=" ".join(self.ini_ifs), AOE_RUN_DIR=self.run_dir,
                    AOE_LINK_DIR=os.path.join(self.run_dir, "etherd"))

    def start(self, ns, args, ready=None, log=None, wait=15.0):
        """A long-running process in a namespace; waits for `ready` in its output if given."""
        out = log or tempfile.TemporaryFile("w+")
        p = subprocess.Popen(self.argv(ns, args), stdout=out, stderr=subprocess.STDOUT,
                             env=self.env())
        self.procs.append(p)
        if ready:
            deadline = time.monotonic() + wait
            while True:
                out.seek(0)
                text = out.read()
                if ready in text:
                    break
                if p.poll() is not None or time.monotonic() > deadline:
                    raise AoeError("%s did not start: %s" % (" ".join(args), text.strip()[-300:]))
                time.sleep(0.05)
        return p

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        self.made = []
        shutil.rmtree(self.run_dir, ignore_errors=True)


def attach_missing():
    """Why attach cannot work here (neither ublk nor nbd), or None."""
    try:
        choose_backend(None, load_helper())
    except AoeError as e:
        return str(e)
    return None


def demo_block_device(lab, step, tmp):
    """attach e0.1, write through the block device, read the target directly, detach."""
    step("attach", "e0.1")
    with open(os.path.join(lab.run_dir, "e0.1.json")) as f:
        dev = "/dev/" + json.load(f)["dev"]
    data = os.urandom(4 << 20)
    with open(dev, "r+b") as f:
        f.seek(64 << 20)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    print("demo: wrote 4 MiB to %s at 64 MiB and fsync'ed it" % dev)
    step("stat")
    copy = os.path.join(tmp, "via-network.bin")
    step("read", "e0.1", copy, "--offset", "64M", "--length", "4M")
    with open(copy, "rb") as f:
        if f.read() != data:
            raise AoeError("demo: the target does not hold what was written to %s" % dev)
    print("demo: the target holds what was written to %s\n" % dev)
    step("detach", "e0.1")


def cmd_demo(args):
    size = 256 << 20
    lab = NetLab(mtu=args.mtu, prefix="aoedemo")
    tmp = tempfile.mkdtemp(prefix="aoe-demo-")

    def step(*words):
        print("$ aoe.py %s" % " ".join(words), flush=True)
        r = subprocess.run(lab.aoe_argv(lab.ini_ns, words), env=lab.env())
        print(flush=True)
        if r.returncode:
            raise AoeError("demo step 'aoe.py %s' failed (exit %d)"
                           % (" ".join(words), r.returncode))

    try:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(size)
        print("demo: namespaces %s and %s joined by veth (MTU %d); serving a "
              "sparse %s image as e0.1"
              % (lab.ini_ns, lab.tgt_ns, args.mtu, human_size(size)))
        log = tempfile.TemporaryFile("w+", dir=tmp)
        lab.start(lab.tgt_ns,
                  [sys.executable, os.path.abspath(__file__), "serve", "0", "1", lab.tgt_if, image],
                  ready="pid ", log=log)
        log.seek(0)
        print("demo: target " + log.readline().strip() + "\n", flush=True)
        step("discover")
        step("stat")
        sample, copy = os.path.join(tmp, "sample.bin"), os.path.join(tmp, "readback.bin")
        with open(sample, "wb") as f:
            f.write(os.urandom(8 << 20))
        step("write", "--yes", "--offset", "1M", sample, "e0.1")
        step("read", "e0.1", copy, "--offset", "1M", "--length", "8M")
        with open(sample, "rb") as a, open(copy, "rb") as b:
            if a.read() != b.read():
                raise AoeError("demo: data read back differs from what was written")
        print("demo: read-back matches the 8 MiB written\n")
        step("bench", "e0.1", "--seconds", "1", "--qd", "16")
        why_not = attach_missing()
        if why_not:
            print("demo: attach skipped: %s" % why_not)
        else:
            demo_block_device(lab, step, tmp)
        print("demo: done; removing the namespaces and the image")
    finally:
        if os.path.exists(os.path.join(lab.run_dir, "e0.1.json")):
            subprocess.run(lab.aoe_argv(lab.ini_ns, ["detach", "--force", "e0.1"]), env=lab.env())
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return EXIT_OK


# =============================================================================
# CLI
# =============================================================================

EXAMPLES = {
    "interfaces": "aoe.py interfaces            # which interfaces AoE may use\n"
                  "AOE_IFLIST='eth1 eth2' aoe.py interfaces",
    "discover": "aoe.py discover\naoe.py discover --iface eth1 --json",
    "stat": "aoe.py stat\naoe.py stat e0.1 --json\naoe.py stat -a",
    "ping": "aoe.py ping 0 1 eth1\naoe.py ping -I -s 3 0 1 eth1",
    "cfg": "aoe.py cfg                           # read every target's config string\n"
           "aoe.py cfg e3.7                      # read one\n"
           "aoe.py cfg -c fset -s 'rack 4' 3 7 eth1\n"
           "aoe.py cfg -c set -s host-a e3.7     # only if still empty\n"
           "aoe.py cfg -c test -s host-a         # which targets have exactly this string",
    "mask": "aoe.py mask e0.1\naoe.py mask e0.1 --add 02:00:00:00:00:01 --delete 02:00:00:00:00:02",
    "reserve": "aoe.py reserve e0.1\naoe.py reserve e0.1 --set\n"
               "aoe.py reserve e0.1 --release --force",
    "sancheck": "aoe.py sancheck\naoe.py sancheck --json",
    "read": "aoe.py read e0.1 disk.img\naoe.py read e0.1 - --offset 1M --length 4k | xxd\n"
            "aoe.py read e0.1 disk.img --resume --checksum sha256",
    "rescue": "aoe.py rescue e0.1 disk.img disk.map\naoe.py rescue -r 3 e0.1 disk.img disk.map\n"
              "ddrescuelog -t disk.map",
    "write": "aoe.py write disk.img e0.1\naoe.py write --yes --offset 1M part.img e0.1",
    "bench": "aoe.py bench e0.1\naoe.py bench e0.1 --bs 4k --qd 32 --pattern rand\n"
             "aoe.py bench e0.1 --write --json",
    "serve": "aoe.py serve 0 1 eth1 disk.img\naoe.py serve -r -b 32 0 2 eth1 /dev/sdb",
    "attach": "aoe.py attach e0.1              # prints /dev/ublkbN or /dev/nbdN; "
              "/dev/etherd/e0.1 links to it\n"
              "aoe.py attach --backend nbd e0.1 # through the kernel's nbd driver "
              "even where ublk works\n"
              "aoe.py attach --ro e0.1\n"
              "aoe.py attach --foreground e0.1 # for systemd, or to watch it\n"
              "aoe.py attach --recover e0.1    # serve it again after the daemon was killed\n"
              "aoe.py attach --upgrade e0.1    # hand it to a new daemon while in use "
              "(ublk, Linux 6.16+)\n"
              "aoe.py attach --all 'e1.*'      # every target of shelf 1 not yet attached\n"
              "aoe.py attach --all --watch     # and those that appear later "
              "(aoe-all.service runs this)",
    "detach": "aoe.py detach e0.1\naoe.py detach /dev/ublkb0\n"
              "aoe.py detach --force e0.1   # even if mounted",
    "flush": "aoe.py flush        # remove attached devices that are down\n"
             "aoe.py flush -a     # remove all",
    "revalidate": "aoe.py revalidate e0.1",
    "version": "aoe.py version",
    "links": "aoe.py links /usr/local/sbin        # then aoe-stat, aoeping, ... run aoe.py",
    "man": "aoe.py man | man -l -\n"
           "aoe.py man > /usr/local/share/man/man8/aoe.py.8   # then: man aoe.py",
    "systemd-units": "aoe.py systemd-units                # print them\n"
                     "sudo aoe.py systemd-units --install && sudo systemctl enable --now aoe@e0.1",
    "demo": "sudo python3 aoe.py demo",
}


def add_common(p, json_flag=True, iface=True):
    p.add_argument("-v", "--verbose", action="store_true",
                   help="more detail, including dropped frames")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")
    if iface:
        p.add_argument("--iface", "-i", action="append", metavar="IFACE",
                       help="use only these interfaces (repeat or comma-separate; default "
                            "$AOE_IFLIST, else every up Ethernet interface)")


def add_wait(p):
    p.add_argument("-w", "--wait", type=float, default=DISCOVER_WAIT, metavar="SECS",
                   help="how long to gather discovery answers (default %(default)s)")


def add_engine(p):
    p.add_argument("--deadsecs", type=positive(float), default=DEFAULT_DEADSECS, metavar="SECS",
                   help="fail I/O after the target is silent this long (default %(default)s)")
    p.add_argument("--maxout", type=positive(int), default=DEFAULT_MAXOUT, metavar="N",
                   help="cap on frames in flight per path (default %(default)s; the target's "
                        "buffer count also caps it)")
    p.add_argument("--no-helper", action="store_true", help="use the pure-Python data path")


def positive(kind, zero_too=False):
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text)
        if value < 0 or value == 0 and not zero_too:
            raise argparse.ArgumentTypeError("must be %s 0"
                                             % ("at least" if zero_too else "greater than"))
        return value
    return check


def read_timeout_arg(text):
    """Seconds a read may wait for its answer: more than 0, at most READ_TIMEOUT_MAX."""
    value = positive(float)(text)
    if not value <= READ_TIMEOUT_MAX:
        raise argparse.ArgumentTypeError("must be at most %d" % READ_TIMEOUT_MAX)
    return value


def sector_set_arg(text):
    """RANGES, or @FILE holding them: a SectorSet (see SectorSet.parse)."""
    where = ""
    try:
        if text.startswith("@"):
            where = text + ": "
            with open(text[1:]) as f:
                text = f.read()
        return SectorSet.parse(text)
    except OSError as e:
        raise argparse.ArgumentTypeError(where + e.strerror)
    except ValueError as e:
        raise argparse.ArgumentTypeError(where + str(e))


def fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit status 2."""

    def error(self, message):
        command = self.prog[len(PROG):].strip()   # main() puts PROG before every error
        raise usage_error("%s%s (see '%s --help')"
                          % (command + ": " if command else "", message, self.prog))


def build_parser():
    parser = Parser(prog=PROG, description="User-space ATA over Ethernet initiator and target.",
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="Run '%s COMMAND --help' for a command's options and examples." % PROG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog="examples:\n"
                                  + "\n".join("  " + l for l in EXAMPLES[name].splitlines()),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("interfaces", cmd_interfaces, "list network interfaces and which ones AoE uses")
    add_common(p)

    p = command("discover", cmd_discover, "find AoE targets (broadcast Query Config)")
    add_common(p)
    add_wait(p)

    p = command("stat", cmd_stat, "show AoE devices: size, interfaces, payload, state")
    p.add_argument("devices", nargs="*", metavar="eX.Y", help="only these devices")
    p.add_argument("-a", "--all", action="store_true",
                   help="also devices that do not answer IDENTIFY")
    add_common(p)
    add_wait(p)

    p = command("ping", cmd_ping, "check that one target answers (like aoeping)")
    p.add_argument("shelf", type=int)
    p.add_argument("slot", type=int)
    p.add_argument("interface")
    p.add_argument("-I", dest="identify", action="store_true", help="print IDENTIFY fields")
    p.add_argument("-i", dest="identify_hex", action="store_true", help="dump IDENTIFY data as hex")
    p.add_argument("-s", dest="timeout", type=positive(float), default=5.0, metavar="SECS",
                   help="give up after this long (default %(default)s)")
    add_common(p, iface=False)

    p = command("cfg", cmd_cfg, "read, test or set config strings (like aoecfg)")
    p.add_argument("target", nargs="*", metavar="[eX.Y | SHELF SLOT] [IFACE]")
    p.add_argument("-c", dest="command", choices=sorted(CCMD_NAMES), default="read",
                   help="read (default), test (exact match), prefix, set (only if "
                        "empty), fset (force)")
    p.add_argument("-s", dest="string", metavar="STRING", help="the config string")
    p.add_argument("-t", dest="timeout", type=positive(float), default=DISCOVER_WAIT,
                   metavar="SECS", help="how long to wait for answers (default %(default)s)")
    p.add_argument("--mac", help="send to this target MAC instead of broadcasting")
    add_common(p)

    p = command("mask", cmd_mask, "read or edit a target's MAC mask list")
    p.add_argument("device", metavar="eX.Y")
    p.add_argument("--add", action="append", default=[], metavar="MAC",
                   help="let this initiator in (repeat for more); a list that is not empty "
                        "keeps every other initiator out")
    p.add_argument("--delete", action="append", default=[], metavar="MAC",
                   help="take this initiator off the list (repeat for more)")
    add_common(p)
    add_wait(p)

    p = command("reserve", cmd_reserve, "read, set or release a target's reservation")
    p.add_argument("device", metavar="eX.Y")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--set", nargs="*", metavar="MAC", help="reserve for these MACs (default: ours)")
    g.add_argument("--release", action="store_true", help="release the reservation")
    p.add_argument("--force", action="store_true", help="override another initiator's reservation")
    add_common(p)
    add_wait(p)

    p = command("sancheck", cmd_sancheck, "check that MTUs and paths carry each target's frames")
    p.add_argument("devices", nargs="*", metavar="eX.Y")
    add_common(p)
    add_wait(p)

    p = command("read", cmd_read, "copy a device (or part) to a file or standard output")
    p.add_argument("device", metavar="eX.Y")
    p.add_argument("output", metavar="FILE|-")
    p.add_argument("--offset", help="start here (bytes; k/M/G suffixes)")
    p.add_argument("--length", help="this many bytes (default: to the end)")
    p.add_argument("--resume", action="store_true", help="continue a partial image")
    p.add_argument("--checksum", choices=["md5", "sha1", "sha256", "sha512"],
                   help="print a checksum of the data")
    add_common(p, json_flag=False)
    add_wait(p)
    add_engine(p)

    p = command("rescue", cmd_rescue, "image a failing device past its unreadable sectors, "
                "keeping GNU ddrescue's mapfile")
    p.add_argument("device", metavar="eX.Y")
    p.add_argument("image", metavar="IMAGE", help="a file (made if missing, never truncated; "
                   "sparse where nothing was read; extended to the domain's end) or a block "
                   "device")
    p.add_argument("mapfile", metavar="MAPFILE",
                   help="GNU ddrescue's mapfile: resumed from if it exists (aoe.py's or "
                        "ddrescue's), kept up to date every few seconds and at the end")
    p.add_argument("--offset", help="the domain starts here (bytes; k/M/G suffixes)")
    p.add_argument("--length", help="the domain's length (default: to the end)")
    p.add_argument("-n", "--no-scrape", action="store_true",
                   help="skip the scraping phase (as ddrescue -n)")
    p.add_argument("-r", "--retry-passes", type=positive(int, zero_too=True), default=0,
                   metavar="N", help="read the bad sectors again N times (default 0)")
    p.add_argument("-R", "--reverse", action="store_true",
                   help="copy, scrape and retry backwards")
    p.add_argument("--copy-timeout", type=read_timeout_arg, default=RESCUE_COPY_TIMEOUT,
                   metavar="SECS", help="how long a copying read may go unanswered before it "
                   "is sent again, unless newer ones are answered (default %(default)s)")
    p.add_argument("--sector-timeout", type=read_timeout_arg, default=RESCUE_SECTOR_TIMEOUT,
                   metavar="SECS", help="the same for a single sector's read in trimming, "
                   "scraping and retries: a bad sector can take a disk that long "
                   "(default %(default)s)")
    add_common(p)
    add_wait(p)
    add_engine(p)

    p = command("write", cmd_write, "copy a file onto a device, then flush the target's cache")
    p.add_argument("input", metavar="FILE")
    p.add_argument("device", metavar="eX.Y")
    p.add_argument("--offset", help="write starting here (bytes; k/M/G suffixes)")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    add_common(p, json_flag=False)
    add_wait(p)
    add_engine(p)

    p = command("bench", cmd_bench, "measure throughput, IOPS and latency")
    p.add_argument("device", metavar="eX.Y")
    p.add_argument("--bs", default="1M", help="block size (default %(default)s)")
    p.add_argument("--qd", type=positive(int), default=16,
                   help="requests in flight (default %(default)s)")
    p.add_argument("--pattern", default="seq,rand",
                   help="seq, rand or seq,rand (default %(default)s)")
    p.add_argument("--seconds", type=positive(float), default=3.0,
                   help="per test (default %(default)s)")
    p.add_argument("--span", help="confine to the first SIZE bytes")
    p.add_argument("--write", action="store_true",
                   help="also run write tests (destroys data on the target)")
    add_common(p)
    add_wait(p)
    add_engine(p)

    p = command("serve", cmd_serve, "export a file or block device as an AoE target (like vblade)")
    p.add_argument("shelf")
    p.add_argument("slot")
    p.add_argument("interface")
    p.add_argument("file")
    p.add_argument("-b", dest="bufcnt", type=positive(int), default=SERVE_BUFCNT,
                   help="buffer count to advertise (default %(default)s; vblade's is 16)")
    p.add_argument("-d", dest="direct", action="store_true", help="O_DIRECT")
    p.add_argument("-s", dest="sync", action="store_true",
                   help="O_SYNC: acknowledge writes once durable")
    p.add_argument("-r", dest="readonly", action="store_true", help="read-only")
    p.add_argument("-m", dest="mask", metavar="MAC[,MAC...]", help="answer only these initiators")
    p.add_argument("-o", dest="offset", help="start of the export in the file (bytes)")
    p.add_argument("-l", dest="length", help="length of the export (bytes)")
    p.add_argument("--user", metavar="NAME|UID",
                   help="once its sockets and FILE are open, run as this user, without "
                        "capabilities or supplementary groups (default when started as root: "
                        "nobody; '--user root' keeps root); started without root, it may name "
                        "only the current user")
    t = p.add_argument_group("testing aids (fault injection; never for production)")
    t.add_argument("--fault-drop", type=fraction, default=0.0, metavar="P",
                   help="drop this fraction of responses")
    t.add_argument("--fault-duplicate", type=fraction, default=0.0, metavar="P",
                   help="send some responses twice")
    t.add_argument("--fault-delay", type=positive(float, zero_too=True), default=0.0, metavar="MS",
                   help="delay every response")
    t.add_argument("--fault-jitter", type=positive(float, zero_too=True), default=0.0, metavar="MS",
                   help="vary the delay by up to this much either way (reorders responses)")
    t.add_argument("--fault-reorder", type=fraction, default=0.0, metavar="P",
                   help="hold back some responses")
    t.add_argument("--fault-forge", type=fraction, default=0.0, metavar="P",
                   help="send forged answers before the true one to this fraction of "
                        "READs (a hostile target)")
    t.add_argument("--fault-seed", type=int, help="random seed for repeatable faults")
    t.add_argument("--fault-bad", type=sector_set_arg, metavar="RANGES|@FILE",
                   help="READs of these sectors fail (N, A-B, A+N, comma-separated; @FILE: "
                        "the same, '#' comments); writes succeed but leave them unreadable")
    t.add_argument("--fault-bad-error", choices=sorted(BAD_SECTOR_ERRORS), default="abrt",
                   help="the ATA error of such a READ (default %(default)s, vblade's; a disk "
                        "says unc)")
    t.add_argument("--fault-bad-delay", type=positive(float, zero_too=True), default=0.0,
                   metavar="MS", help="answer such a READ this much later, others meanwhile")
    add_common(p, json_flag=False, iface=False)

    p = command("attach", cmd_attach, "make eX.Y a block device (/dev/ublkbN or /dev/nbdN, linked "
                                      "as /dev/etherd/eX.Y)")
    p.add_argument("device", nargs="*", metavar="eX.Y | PATTERN",
                   help="the device; with --all, shell patterns such as 'e1.*' (default: all)")
    p.add_argument("--all", action="store_true",
                   help="attach every target that answers and matches")
    p.add_argument("--watch", action="store_true",
                   help="with --all: keep attaching targets as they appear, and take back "
                        "devices whose daemon died (for a service)")
    p.add_argument("--interval", type=positive(float), default=WATCH_INTERVAL, metavar="SECS",
                   help="with --watch: discover this often (default %(default)s)")
    p.add_argument("--flush-down", type=positive(float), metavar="SECS",
                   help="with --watch: detach devices down this long (default: keep them)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="the kernel driver to attach with (default: ublk where it works, else nbd)")
    p.add_argument("--ro", action="store_true", help="read-only block device")
    p.add_argument("--scheduler", choices=IO_SCHEDULERS, default=IO_SCHEDULERS[0],
                   help="the I/O scheduler of a device it makes (default %(default)s: the target "
                        "orders its own disk's work; kernel: keep the kernel's choice)")
    p.add_argument("--foreground", action="store_true",
                   help="serve in this process; logs to standard error")
    p.add_argument("--recover", action="store_true",
                   help="serve an attached device again after its daemon died (with --all: "
                        "every such device, in one process)")
    p.add_argument("--upgrade", action="store_true",
                   help="take an attached device over from its running daemon, I/O paused "
                        "meanwhile (ublk with QUIESCE: Linux 6.16 or later)")
    add_common(p)
    add_wait(p)
    add_engine(p)

    p = command("detach", cmd_detach,
                "remove an attached device (flushes first; works if the target is gone)")
    p.add_argument("device", metavar="eX.Y|/dev/ublkbN|/dev/nbdN")
    p.add_argument("--force", action="store_true", help="even if mounted or open")
    add_common(p, json_flag=False, iface=False)

    p = command("flush", cmd_flush, "remove attached devices that are down (like aoe-flush)")
    p.add_argument("devices", nargs="*", metavar="eX.Y", help="only these (down or not)")
    p.add_argument("-a", "--all", action="store_true", help="all attached devices")
    p.add_argument("--force", action="store_true", help="even if mounted or open")
    add_common(p, json_flag=False, iface=False)

    p = command("systemd-units", cmd_systemd_units, "print or install systemd units that attach "
                                                    "devices at boot (aoe@eX.Y.service, "
                                                    "aoe-all.service)")
    p.add_argument("--install", action="store_true",
                   help="write them to %s and reload systemd" % SYSTEMD_DIR)
    p.add_argument("--dir", help="write them here instead")

    p = command("links", cmd_links, "make links named like aoetools' commands (aoe-stat, aoeping, "
                                    "...) to aoe.py: run under those names it behaves like them")
    p.add_argument("dir", metavar="DIR", help="where (e.g. /usr/local/sbin)")
    p.add_argument("--force", action="store_true", help="replace files of those names")

    command("man", cmd_man, "print this manual page (roff), made from these commands' own "
                            "options and examples")

    p = command("revalidate", cmd_revalidate, "re-read a target's size; an attached device takes "
                                              "the new size (ublk with "
                                              "UPDATE_SIZE: Linux 6.16 or later)")
    p.add_argument("device", metavar="eX.Y")
    p.add_argument("--force", action="store_true",
                   help="shrink the device even while it is mounted or open")
    add_common(p, json_flag=False)
    add_wait(p)

    p = command("demo", cmd_demo,
                "try everything on a private pair of namespaces with a built-in target")
    p.add_argument("--mtu", type=int, default=9000,
                   help="MTU of the demo's veth pair (default %(default)s)")

    p = command("version", cmd_version, "print versions")
    add_common(p, iface=False)
    return parser


# --- aoetools drop-in --------------------------------------------------------
#
# A link named like one of aoetools' commands (aoe-stat -> aoe.py; `aoe.py links
# DIR` makes all nine) makes aoe.py take that tool's arguments and print what it
# prints, with its exit codes, so scripts written for aoetools on the kernel
# driver keep working.  The devices the tools see are the targets that answer
# discovery and the attached devices, as the kernel driver's would be.  Each
# tool runs aoe.py's own verb (--json where it must reshape the output).

AOETOOLS = ("aoe-discover", "aoe-stat", "aoe-flush", "aoe-interfaces", "aoe-revalidate",
            "aoe-sancheck", "aoe-version", "aoeping", "aoecfg")


class ToolUsage(Exception):
    """Wrong arguments for an aoetools command: its usage line, exit status 1."""


def run_verb(argv, quiet=False):
    """(exit status, what stdout got) of aoe.py's own verb; errors still go to stderr."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(argv)
    text = out.getvalue()
    if not quiet:
        sys.stdout.write(text)
    return status, text


def tool_options(argv, letters, takes_value):
    """getopt for an aoetools command: (options dict, operands); ToolUsage on a bad option."""
    try:
        opts, rest = getopt.getopt(argv,
                                   "".join(c + (":" if c in takes_value else "") for c in letters))
    except getopt.GetoptError as e:
        raise ToolUsage(str(e))
    return dict(opts), rest


def tool_discover(argv):
    """aoe-discover: ask every target to announce itself; prints nothing."""
    return run_verb(["discover", "-w", "0.2"], quiet=True)[0]


def tool_stat(argv):
    """aoe-stat [REGEX]: the known devices in aoe-stat's columns, sorted, filtered like grep."""
    status, text = run_verb(["stat", "--json", "-a"], quiet=True)
    if status and not text:
        return status
    state = {STATE_DEAD: STATE_DOWN, STATE_UNRESPONSIVE: STATE_DOWN}   # the kernel driver's words
    lines = sorted(aoestat_line(d, state.get(d["state"], d["state"])) for d in json.loads(text))
    pattern = re.compile(argv[0] if argv else ".")
    shown = [line for line in lines if pattern.search(line)]
    for line in shown:
        print(line)
    # grep's status, as aoe-stat's pipeline ends
    return EXIT_OK if shown else EXIT_FAIL


def tool_flush(argv):
    """aoe-flush [-a | eX.Y ...]: remove down devices, all of them, or those named."""
    if argv[:1] == ["-a"]:
        return run_verb(["flush", "-a"], quiet=True)[0]
    attached = {a.device for a in Attachment.all()}
    unknown = [d for d in argv if d not in attached]
    for d in unknown:
        sys.stderr.write('%s Error: "%s" is not an aoe device\n' % (PROG, d))
    if unknown:
        return EXIT_FAIL
    return run_verb(["flush"] + argv, quiet=True)[0]


def tool_interfaces(argv):
    """aoe-interfaces [-c] [IFACE ...]: show, clear (-c) or set the interfaces AoE may use."""
    if not argv:
        print(" ".join(saved_iflist()))
        return EXIT_OK
    if argv[0] == "-c":
        if len(argv) > 1:
            sys.stderr.write("%s Error: -c flag takes no arguments\n" % PROG)
            return EXIT_FAIL
        argv = []
    missing = [name for name in argv if not os.path.isdir(os.path.join(SYS_NET, name))]
    for name in missing:
        sys.stderr.write('%s Error: "%s" is not a network interface\n' % (PROG, name))
    if missing:
        return EXIT_FAIL
    save_iflist(argv)
    return EXIT_OK


def tool_revalidate(argv):
    """aoe-revalidate eX.Y: re-read the target's size (the attached device takes it)."""
    if not argv:
        raise ToolUsage("Usage: %s e{major}.{minor}" % PROG)
    status = EXIT_OK
    for device in argv:
        status = run_verb(["revalidate", device], quiet=True)[0] or status
    return status


def tool_sancheck(argv):
    """aoe-sancheck: the interface and device summaries, then what is wrong."""
    status, text = run_verb(["sancheck", "--json"], quiet=True)
    if not text:
        return status
    report = json.loads(text)
    rule = "=" * 42
    print("Probing...done.")
    print("%s\nINTERFACE SUMMARY\n%s" % (rule, rule))
    print("Name\tStatus\tMTU\tPCI ID")
    for ifc in select_interfaces(iflist_from(None)):
        print("%s\t%s\t%d\t" % (ifc.name, "UP" if ifc.up else "DOWN", ifc.mtu))
    print("%s\nDEVICE SUMMARY\n%s" % (rule, rule))
    print("Device\tMacs\tPayload\tLocal Interfaces")
    for r in report:
        print("%s\t%4d\t%d\t%s" % (r["device"], r["macs"], r["payload"], " ".join(r["interfaces"])))
    advice = [line for r in report for line in r["advice"]]
    if advice:
        print("%s\nANALYSIS\n%s" % (rule, rule))
        for line in advice:
            print(line)
    return EXIT_OK


def tool_version(argv):
    """aoe-version: the tools' and the driver's versions (aoe.py is both)."""
    helper = "helper built" if load_helper() else "pure Python"
    print("              aoetools:\taoe.py %s" % __version__)
    print("  installed aoe driver:\taoe.py %s (user space, %s)" % (__version__, helper))
    print("    running aoe driver:\taoe.py %s (user space, %s)" % (__version__, helper))
    return EXIT_OK


def hex_lines(data):
    return "".join(" ".join("%02x" % b for b in data[i:i + 16]) + " \n"
                   for i in range(0, len(data), 16))


def tool_ping(argv):
    """aoeping [-i] [-I] [-v] [-s SECS] [-t TAG] SHELF SLOT IFACE: silent and 0 when the
    target answers; killed by SIGALRM, as aoeping's timer ends it, when it does not."""
    opts, rest = tool_options(argv, "iIvhs:S:t:", "sSt")
    if "-h" in opts or len(rest) != 3:
        raise ToolUsage("usage: %s [-i] [-I] [-v] [-s seconds] {shelf} {slot} {netif}" % PROG)
    if "-S" in opts:
        sys.stderr.write("%s: SMART (-S) is not supported\n" % PROG)
        return EXIT_FAIL
    shelf, slot, ifname = rest
    verb = (["ping", "--json", "-s", opts.get("-s", "5")]
            + (["-I"] if "-i" in opts or "-I" in opts else []))
    with contextlib.redirect_stderr(io.StringIO()) as errors:
        status, text = run_verb(verb + [shelf, slot, ifname], quiet=True)
    if status:
        said = errors.getvalue()
        if "no answer" not in said:
            sys.stderr.write(said)
            return status
        sys.stdout.flush()
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGALRM)
        return 128 + signal.SIGALRM
    r = json.loads(text)
    if "-v" in opts:
        answer = bytes.fromhex(r["answer"])
        print("tag: %08x\neth: %s\nshelf: %s\nslot: %s"
              % (struct.unpack_from(">I", answer, 20)[0], ifname, shelf, slot))
        print("config query response:")
        sys.stdout.write(hex_lines(answer))
        print("found %s with mac %s" % (r["device"], r["mac"].replace(":", "")))
    if "-i" in opts:
        print("device identify response:")
        sys.stdout.write(hex_lines(bytes.fromhex(r["identify"]["raw"])))
    elif "-I" in opts:
        ident = Identify(bytes.fromhex(r["identify"]["raw"]))
        print("device identify fields:")
        for i in range(3):
            print("vendor_specific_%d: 0x%x" % (i, ident.words[7 + i]))
        print("serial_number: %s\nfirmware_rev: %s\nmodel: %s" % (
            ident.padded_text(10, 20), ident.padded_text(23, 27), ident.padded_text(27, 47)))
    return EXIT_OK


def tool_cfg(argv):
    """aoecfg [-c CMD] [-s STRING] [-t SECS] [SHELF SLOT] [IFACE]: aoe.py cfg takes the same."""
    opts, rest = tool_options(argv, "c:s:t:", "cst")
    if opts.get("-c", "read") not in CCMD_NAMES or len(rest) > 3:
        raise ToolUsage("usage: %s [-c cmd] [-s cfgstr] [-t timeout] [shelf slot] [net]" % PROG)
    verb = ["cfg"] + [w for k in ("-c", "-s", "-t") if k in opts for w in (k, opts[k])]
    return run_verb(verb + rest)[0]


TOOL_RUNNERS = {"aoe-discover": tool_discover, "aoe-stat": tool_stat, "aoe-flush": tool_flush,
                "aoe-interfaces": tool_interfaces, "aoe-revalidate": tool_revalidate,
                "aoe-sancheck": tool_sancheck, "aoe-version": tool_version, "aoeping": tool_ping,
                "aoecfg": tool_cfg}


def run_as_tool(name, argv):
    """aoe.py invoked as aoetools' `name`."""
    global PROG
    PROG = name
    try:
        return TOOL_RUNNERS[name](argv)
    except ToolUsage as e:
        sys.stderr.write("%s\n" % e)
        return EXIT_FAIL
    except AoeError as e:
        sys.stderr.write("%s: %s\n" % (PROG, e))
        return e.code


def cmd_links(args):
    """Make DIR/aoe-stat, DIR/aoeping, ... links to this aoe.py (the aoetools drop-in)."""
    target = os.path.abspath(__file__)
    mode = os.stat(target).st_mode
    if mode & 0o111 != 0o111:                     # links run it through its #! line
        os.chmod(target, mode | 0o111)
        print("%s: made executable" % target)
    os.makedirs(args.dir, exist_ok=True)
    for name in AOETOOLS:
        path = os.path.join(args.dir, name)
        if os.path.lexists(path):
            if os.path.islink(path) and os.path.realpath(path) == os.path.realpath(target):
                continue
            if not args.force:
                raise AoeError("%s exists (aoetools installed?): --force replaces it" % path)
            os.unlink(path)
        os.symlink(target, path)
        print("%s -> %s" % (path, target))
    return EXIT_OK


# --- man page ----------------------------------------------------------------
#
# aoe.py(8) is rendered from build_parser() (every command, option, default and
# example), the aoetools runners' docstrings and the constants below, so it says
# what this aoe.py does; `aoe.py man | man -l -` shows it, pip installs it.

MAN_SECTION = 8
MAN_PAGE = "%s.%d" % (PROG, MAN_SECTION)
AOETOOLS_PREFIX = "aoe"
# name -> what it changes (every os.environ lookup in this file; a test holds them equal)
ENVIRONMENT = (
    ("AOE_IFLIST", "the interfaces AoE may use (space- or comma-separated) where no --iface "
                   "is given, like the kernel driver's aoe_iflist; without it, the list "
                   "aoe-interfaces saved, else every up Ethernet interface"),
    ("AOE_RUN_DIR", "where attached devices' records and logs and the saved interface list "
                    "are kept (default %s)" % DEFAULT_RUN_DIR),
    ("AOE_LINK_DIR", "where the eX.Y links to attached devices are made (default %s)"
                     % DEFAULT_LINK_DIR),
    ("AOE_NO_HELPER", "if set, use the pure-Python data path even where the compiled helper "
                      "is built (as --no-helper)"),
    ("AOE_NBD_IOCTL", "if set, attach --backend nbd configures the device through nbd's "
                      "ioctls instead of its netlink interface"),
    ("AOE_SERVE_THREADS", "serve's fast-path threads (default: one per CPU it may run on but "
                          "one, at most 4)"),
    ("NOTIFY_SOCKET", "set by systemd for a Type=notify service: attach --foreground tells it "
                      "when the device is ready"),
)
SEE_ALSO = tuple((name, MAN_SECTION) for name in sorted(AOETOOLS)) + (
    ("vblade", 8), ("ddrescue", 1), ("ddrescuelog", 1), ("systemctl", 1))
# characters roff would take for its own (backslash first: the others bring one)
ROFF_ESCAPES = (("\\", "\\(rs"), ("-", "\\-"), ("'", "\\(aq"), ("`", "\\(ga"), ("^", "\\(ha"),
                ("~", "\\(ti"))
# what a user types or fills in within a usage line: options, metavars, choices
USAGE_WORD = re.compile(r"[^\s\[\]{}|,.]+(?:\.[^\s\[\]{}|,.]+)*")


def man_files():
    """(path, what it is) for the FILES section, at their default places."""
    files = [(os.path.join(DEFAULT_RUN_DIR, "eX.Y.json"),
              "an attached device's record: where stat, detach, flush and attach --recover "
              "find its daemon"),
             (os.path.join(DEFAULT_RUN_DIR, "eX.Y.log"), "that daemon's log"),
             (os.path.join(DEFAULT_RUN_DIR, ATTACH_ALL_LOG),
              "the log of attach --all, serving in the background"),
             (os.path.join(DEFAULT_RUN_DIR, os.path.basename(IFLIST_FILE)),
              "the interfaces aoe-interfaces saved"),
             (os.path.join(DEFAULT_LINK_DIR, "eX.Y"),
              "a link to the attached device's /dev/ublkbN or /dev/nbdN")]
    return files + [(os.path.join(SYSTEMD_DIR, name),
                     what.replace("%i", "eX.Y") + "; written by systemd-units --install")
                    for name, (what, _, _) in sorted(SYSTEMD_UNITS.items())]


def roff_chars(text):
    """Text with the characters roff would interpret written as escapes."""
    for char, escape in ROFF_ESCAPES:
        text = text.replace(char, escape)
    return text


def roff_text(text):
    """Lines of text for the page, none of them taken for a request."""
    return "\n".join(("\\&" if line.startswith(".") else "") + line
                     for line in roff_chars(text).split("\n"))


def roff_prose(text):
    """A paragraph's words, filled by roff (one line: argparse's help strings wrap anywhere)."""
    return roff_text(" ".join(text.split()))


def sentence(text):
    """Help text as a sentence of the page: capital first (but aoe.py's name), a full stop."""
    if not text.startswith(PROG):
        text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def roff_usage(text):
    """A usage fragment: options bold, what the user fills in italic, brackets and bars plain,
    and spaces unbreakable, so a line never breaks inside it."""
    out, end = [], 0
    for word in USAGE_WORD.finditer(text):
        out.append(roff_chars(text[end:word.start()]))
        out.append("\\f%s%s\\fR" % ("B" if word.group().startswith("-") else "I",
                                     roff_chars(word.group())))
        end = word.end()
    out.append(roff_chars(text[end:]))
    return "".join(out).replace(" ", "\\ ")


def listed_actions(parser):
    """A parser's arguments as its usage shows them: all but -h/--help and the commands."""
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def action_args(formatter, action):
    """What follows an option (or stands for a positional), as argparse shows it."""
    if action.option_strings:
        return formatter._format_args(action,
                                      formatter._get_default_metavar_for_optional(action))
    return formatter._format_args(action, formatter._get_default_metavar_for_positional(action))


def action_usage(formatter, action):
    """One argument in a usage line, roff: -w SECS, FILE, ..."""
    args = action_args(formatter, action)
    if not action.option_strings:
        return roff_usage(args)
    return roff_usage(action.option_strings[0] + (" " + args if action.nargs != 0 else ""))


def man_synopsis(parser):
    """The command's arguments in argparse's usage order: options first, mutually exclusive
    ones as [A | B], then the positionals."""
    formatter = parser._get_formatter()
    exclusive = {a: g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    actions = listed_actions(parser)
    parts, shown = [], set()
    for action in [a for a in actions if a.option_strings] + \
            [a for a in actions if not a.option_strings]:
        group = exclusive.get(action)
        if group is None:
            part = action_usage(formatter, action)
            parts.append("[%s]" % part if action.option_strings and not action.required
                         else part)
        elif group not in shown:
            part = "\\ |\\ ".join(action_usage(formatter, a) for a in group._group_actions)
            parts.append(part if group.required else "[%s]" % part)
            shown.add(group)
    return " ".join(parts)


def man_options(parser):
    """.TP entries for a command's arguments, group by group, a group of its own titled."""
    formatter, listed, lines = parser._get_formatter(), listed_actions(parser), []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a in listed
                   and (a.option_strings or a.help)]     # a bare positional: the synopsis says it
        if not actions:
            continue
        if group not in (parser._positionals, parser._optionals):
            lines += [".PP", "\\fI%s\\fR" % roff_prose(sentence(group.title)[:-1] + ":")]
        for action in actions:
            if action.option_strings:
                tag = ", ".join("\\fB%s\\fR" % roff_chars(o) for o in action.option_strings)
                if action.nargs != 0:
                    tag += " " + roff_usage(action_args(formatter, action))
            else:
                tag = action_usage(formatter, action)
            lines += [".TP", tag]
            if action.help:
                lines.append(roff_prose(sentence(formatter._expand_help(action))))
    return lines


def examples_block(text):
    """Lines shown as typed, indented."""
    return [".PP", "Examples:", ".RS 4", ".nf", roff_text(text), ".fi", ".RE"]


def tool_verb(name):
    """The aoe.py command aoetools' `name` runs: its name past the prefix (aoeping: ping)."""
    return name[len(AOETOOLS_PREFIX):].lstrip("-")


def tool_usage(name):
    """(its arguments, what it does) of aoetools' `name`, from its runner's docstring."""
    usage, _, what = " ".join(TOOL_RUNNERS[name].__doc__.split()).partition(": ")
    return usage[len(name):].strip(), what


def man_page(parser):
    """aoe.py(8) in roff (man(7) macros), made from the parser and the aoetools runners."""
    if __doc__ is None:
        raise AoeError("the manual page is made from docstrings, which python -OO drops: "
                       "run aoe.py man without -OO")
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    title = parser.description.rstrip(".")
    lines = ['.TH "%s" %d "" "%s %s" "System Manager\\(aqs Manual"'
             % (roff_chars(PROG.upper()), MAN_SECTION, roff_chars(PROG), __version__),
             # no hyphenation (groff's man macros take it from HY), ragged right: commands
             # and options in the text are not to be split or spread
             ".nr HY 0", ".ad l",
             ".SH NAME",
             "%s \\- %s" % (roff_chars(PROG), roff_chars(title[:1].lower() + title[1:])),
             ".SH SYNOPSIS"]
    for name, sub in commands.choices.items():
        lines += [".SY %s" % roff_chars(PROG), "\\fB%s\\fR %s" % (roff_chars(name),
                                                                  man_synopsis(sub)), ".YS"]
    for name in AOETOOLS:
        args = tool_usage(name)[0]
        lines += [".SY %s" % roff_chars(name)] + ([roff_usage(args)] if args else []) + [".YS"]
    summary = __doc__.split("\n\n")[1]                # the module docstring's, for users
    lines += [".SH DESCRIPTION", ".PP",
              roff_prose("%s %s" % (PROG, summary[:1].lower() + summary[1:])),
              ".PP", roff_prose("Every command takes -h, --help: its usage, options and examples. "
                                "Device names are eSHELF.SLOT (e0.1). Installed by pip, the "
                                "command is named aoe."),
              ".SH COMMANDS"]
    for name, sub in commands.choices.items():
        lines += [".SS %s" % roff_chars(name), roff_prose(sentence(sub.description))]
        lines += man_options(sub) + examples_block(EXAMPLES[name])
    lines += [".SH AOETOOLS COMMANDS", ".PP",
              roff_prose("Run under one of aoetools' names (aoe.py links DIR makes the links), "
                         "aoe.py takes that tool's arguments, prints what it prints and exits "
                         "as it does, so scripts written for aoetools on the kernel's aoe driver "
                         "keep working. Each goes with the command of its name:")]
    for name in AOETOOLS:
        args, what = tool_usage(name)
        lines += [".TP", "\\fB%s\\fR %s" % (roff_chars(name), roff_usage(args)),
                  roff_prose(sentence(what)) + " See \\fB%s\\fR above."
                  % roff_chars(tool_verb(name))]
    lines += [".SH EXIT STATUS"]
    for code, meaning in sorted(EXIT_MEANINGS.items()):
        lines += [".TP", "\\fB%d\\fR" % code, roff_prose(sentence(meaning))]
    lines += [".SH ENVIRONMENT"]
    for name, meaning in ENVIRONMENT:
        lines += [".TP", "\\fB%s\\fR" % roff_chars(name), roff_prose(sentence(meaning))]
    lines += [".SH FILES"]
    for path, meaning in man_files():
        lines += [".TP", "\\fI%s\\fR" % roff_chars(path), roff_prose(sentence(meaning))]
    lines += [".SH SEE ALSO", ",\n".join(".BR %s (%d)" % (roff_chars(name), section)
                                          for name, section in SEE_ALSO)]
    return "\n".join(lines) + "\n"


def cmd_man(args):
    """Print aoe.py(8), made from this file: it describes the aoe.py that prints it."""
    sys.stdout.write(man_page(build_parser()))
    return EXIT_OK


def main(argv=None):
    invoked_as = os.path.basename(sys.argv[0])
    if argv is None and invoked_as in AOETOOLS:
        return run_as_tool(invoked_as, sys.argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        return args.func(args)
    except AoeError as e:
        sys.stderr.write("%s: %s\n" % (PROG, e))
        return e.code
    except KeyboardInterrupt:
        sys.stderr.write("%s: interrupted\n" % PROG)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        try:
            sys.stdout = None
        finally:
            return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
