"""Tests for aoe.py.

Groups (pytest markers), each needing more of the machine:
  codec  - pure functions on bytes; need nothing.
  net    - two network namespaces joined by a veth pair, created and removed by
           the test, with real vblade and aoetools on the far side; need root,
           iproute2, vblade and aoetools.
When a group's needs are missing it is skipped with the reason, except under
CI (CI=true), where a missing need is a failure: CI must run everything.
"""

import argparse
import collections
import contextlib
import errno
import glob
import hashlib
import importlib.util
import json
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import threading
import time
import types
import warnings

import pytest

import aoe

HERE = os.path.dirname(os.path.abspath(__file__))
AOE_PY = os.path.join(HERE, "aoe.py")


def need(condition, reason):
    """Skip (or, under CI, fail) a test whose environment is missing."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail("CI must run this test but: " + reason)
    pytest.skip(reason)


def seeded_bytes(rng, count):
    """rng.randbytes(count), which Python 3.6 lacks: the same bytes from the same seed."""
    return rng.getrandbits(8 * count).to_bytes(count, "little") if count else b""


def in_standard_library(name):
    """Whether this Python's standard library has the top-level module `name`."""
    if hasattr(sys, "stdlib_module_names"):
        return name in sys.stdlib_module_names
    # Python 3.6 to 3.9 lack sys.stdlib_module_names: where the module is found tells
    if name in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(name)
    origin = (spec and spec.origin) or ""
    return origin.startswith(sysconfig.get_paths()["stdlib"] + os.sep) and \
        "site-packages" not in origin


# -----------------------------------------------------------------------------
# codec: byte vectors written out from the AoE r11 spec
# -----------------------------------------------------------------------------

MAC_I = bytes.fromhex("020000000001")
MAC_T = bytes.fromhex("020000000002")


def spec_header(dst, src, verfl, err, major, minor, cmd, tag):
    """The common header written field by field, independent of aoe.py's packer."""
    return (dst + src + b"\x88\xa2" + bytes([verfl, err]) + major.to_bytes(2, "big")
            + bytes([minor, cmd]) + tag.to_bytes(4, "big"))


@pytest.mark.codec
def test_query_config_request_bytes():
    frame = aoe.pack_cfg(aoe.BROADCAST_MAC, MAC_I, 0xFFFF, 0xFF, 0x80000001,
                         aoe.ConfigInfo(ccmd=aoe.AOECCMD_FSET, config=b"abc"))
    expect = spec_header(b"\xff" * 6, MAC_I, 0x10, 0, 0xFFFF, 0xFF, 1, 0x80000001)
    expect += b"\x00\x00" + b"\x00\x00" + b"\x00" + b"\x14" + b"\x00\x03" + b"abc"
    assert frame[:len(expect)] == expect
    assert len(frame) == 60 and frame[len(expect):] == bytes(60 - len(expect))


@pytest.mark.codec
def test_query_config_response_parse_ignores_padding():
    body = b"\x00\x10" + b"\x40\x19" + b"\x11" + b"\x10" + b"\x00\x05" + b"hello"
    # 37 bytes, unpadded like vblade
    raw = spec_header(MAC_I, MAC_T, 0x18, 0, 3, 7, 1, 0x80000002) + body
    f = aoe.parse_frame(raw)
    assert (f.shelf, f.slot, f.command, f.tag, f.src) == (3, 7, 1, 0x80000002, MAC_T)
    assert f.is_response and not f.is_error
    info = aoe.parse_cfg(f)
    assert (info.bufcnt, info.fwver, info.scnt, info.aoever, info.ccmd, info.config) == \
        (16, 0x4019, 17, 1, 0, b"hello")
    padded = aoe.parse_cfg(aoe.parse_frame(raw + b"\xee" * 23))
    assert padded.config == b"hello"


@pytest.mark.codec
def test_ata_read_request_lba48_bytes():
    ata = aoe.AtaFields(aoe.AOEAFL_EXT, 0, 17, aoe.ATA_CMD_PIO_READ_EXT, 0x0123456789AB)
    frame = aoe.pack_ata(MAC_T, MAC_I, 0, 1, 0xC0010002, ata)
    expect = spec_header(MAC_T, MAC_I, 0x10, 0, 0, 1, 0, 0xC0010002)
    expect += bytes([0x40, 0, 17, 0x24]) + bytes([0xAB, 0x89, 0x67, 0x45, 0x23, 0x01]) + b"\x00\x00"
    assert frame[:36] == expect and len(frame) == 60


@pytest.mark.codec
def test_ata_lba28_puts_high_nibble_under_mode_bits():
    ata = aoe.AtaFields(0, 0, 2, aoe.ATA_CMD_PIO_WRITE, 0x0ABCDEF1, b"\x55" * 1024)
    frame = aoe.pack_ata(MAC_T, MAC_I, 5, 9, 7, ata)
    assert frame[28:34] == bytes([0xF1, 0xDE, 0xBC, 0xEA, 0, 0])
    assert frame[36:] == b"\x55" * 1024
    back = aoe.parse_ata(aoe.parse_frame(frame))
    assert back.lba == 0x0ABCDEF1 and back.count == 2 and bytes(back.data) == b"\x55" * 1024


@pytest.mark.codec
def test_mask_and_reserve_round_trip():
    info = aoe.MaskInfo(aoe.MCMD_EDIT, 0, [(aoe.DCMD_ADD, MAC_I), (aoe.DCMD_DELETE, MAC_T)])
    frame = aoe.pack_mask(MAC_T, MAC_I, 1, 2, 3, info)
    assert frame[24:28] == bytes([0, 1, 0, 2])
    assert frame[28:36] == b"\x00\x01" + MAC_I and frame[36:44] == b"\x00\x02" + MAC_T
    back = aoe.parse_mask(aoe.parse_frame(frame))
    assert back.mcmd == aoe.MCMD_EDIT and back.directives == info.directives
    frame = aoe.pack_reserve(MAC_T, MAC_I, 1, 2, 3, aoe.ReserveInfo(aoe.RCMD_FORCE, [MAC_I, MAC_T]))
    assert frame[24:26] == bytes([2, 2]) and frame[26:38] == MAC_I + MAC_T
    back = aoe.parse_reserve(aoe.parse_frame(frame))
    assert back.rcmd == aoe.RCMD_FORCE and back.macs == [MAC_I, MAC_T]


@pytest.mark.codec
@pytest.mark.parametrize("raw, reason", [
    (b"", "short"),
    (b"\x00" * 23, "short"),
    (spec_header(MAC_I, MAC_T, 0x18, 0, 0, 1, 1, 1)[:12] + b"\x08\x00" + bytes(10), "not_aoe"),
    (spec_header(MAC_I, MAC_T, 0x28, 0, 0, 1, 1, 1), "version"),
])
def test_malformed_frames_are_rejected_by_reason(raw, reason):
    with pytest.raises(aoe.FrameError) as e:
        aoe.parse_frame(raw)
    assert e.value.reason == reason


@pytest.mark.codec
def test_truncated_bodies_are_rejected():
    head = spec_header(MAC_I, MAC_T, 0x18, 0, 0, 1, 1, 1)
    for parse, body in ((aoe.parse_cfg, b"\x00" * 7),
                        (aoe.parse_cfg, b"\x00" * 6 + b"\x00\x09" + b"x"),
                        (aoe.parse_ata, b"\x00" * 11),
                        (aoe.parse_mask, b"\x00\x00\x00\x02" + bytes(8)),
                        (aoe.parse_reserve, b"\x00\x01" + bytes(5))):
        with pytest.raises(aoe.FrameError):
            parse(aoe.parse_frame(head + body))


def vblade_style_identify(sectors):
    """IDENTIFY data laid out the way vblade's ata.c fills it, written independently."""
    words = [0] * 256
    words[83] = 0x5400
    def text(first, length, s):
        s = s.ljust(length)
        for i in range(0, length, 2):
            words[first + i // 2] = ord(s[i]) << 8 | ord(s[i + 1])
    text(27, 40, "Coraid EtherDrive vblade")
    text(23, 8, "V25")
    text(10, 20, "0.1:host")
    lba28 = min(sectors, 0x0FFFFFFF)
    words[60], words[61] = lba28 & 0xFFFF, lba28 >> 16
    for i in range(4):
        words[100 + i] = sectors >> (16 * i) & 0xFFFF
    return struct.pack("<256H", *words)


@pytest.mark.codec
def test_identify_parse_lba48_and_strings():
    ident = aoe.Identify(vblade_style_identify(0x123456789))
    assert ident.model == "Coraid EtherDrive vblade"
    assert ident.firmware == "V25" and ident.serial == "0.1:host"
    assert ident.lba48 and ident.sectors == 0x123456789 and ident.lba28_sectors == 0x0FFFFFFF


@pytest.mark.codec
def test_identify_lba28_only_device_uses_words_60_61():
    data = bytearray(vblade_style_identify(1000))
    data[83 * 2:83 * 2 + 2] = b"\x00\x00"            # no LBA48 support
    data[200:208] = bytes(8)
    ident = aoe.Identify(bytes(data))
    assert not ident.lba48 and ident.sectors == 1000


@pytest.mark.codec
def test_build_identify_is_parsed_back():
    ident = aoe.Identify(aoe.build_identify(131072, "model x", "serial y", "V1"))
    assert (ident.model, ident.serial, ident.firmware, ident.sectors, ident.lba48) == \
        ("model x", "serial y", "V1", 131072, True)


@pytest.mark.codec
@pytest.mark.parametrize("text, expect",
                         [("e0.1", (0, 1)), ("3.7", (3, 7)), ("E65534.254", (65534, 254))])
def test_device_names(text, expect):
    assert aoe.parse_device(text) == expect


@pytest.mark.codec
@pytest.mark.parametrize("text", ["e0", "x0.1", "e0.1.2", "e-1.0", "e65535.0", "e0.255", "", "e.1"])
def test_bad_device_names(text):
    with pytest.raises(aoe.AoeError) as e:
        aoe.parse_device(text)
    assert e.value.code == aoe.EXIT_USAGE


@pytest.mark.codec
@pytest.mark.parametrize("argv, said", [
    (["--watch", "e0.1"], "--watch goes with --all"),
    (["e0.1", "e0.2"], "attach takes one eX.Y"),
    (["--upgrade", "--recover", "e9.9"], "--upgrade and --recover exclude each other"),
    (["--all", "--foreground"], "no --upgrade or --foreground"),
    (["--all", "--watch", "--recover"], "no --recover")])
def test_attach_refuses_options_that_do_not_go_together(argv, said, capsys, monkeypatch, tmp_path):
    """Each in one line with exit status 2, before anything is looked for or made."""
    monkeypatch.setattr(aoe, "RUN_DIR", str(tmp_path))
    assert aoe.main(["attach"] + argv) == aoe.EXIT_USAGE
    err = capsys.readouterr().err
    assert said in err and len(err.splitlines()) == 1


@pytest.mark.codec
def test_frame_sizes_follow_mtu_and_target():
    assert aoe.frame_sectors(1500) == 2 and aoe.frame_sectors(9000) == 17
    assert aoe.sectors_per_frame(9000, 2) == 2
    assert aoe.sectors_per_frame(1500, 17) == 2
    assert aoe.sectors_per_frame(9000, 0) == aoe.DEFAULT_SECTORS_PER_FRAME


@pytest.mark.codec
def test_status_text_names_errors():
    assert "target is reserved" in aoe.status_text(-(aoe.STATUS_AOE_ERROR | aoe.AOEERR_RESERVED))
    assert "past the end" in aoe.status_text(-(aoe.STATUS_ATA_ERROR | aoe.ATA_IDNF))
    assert aoe.status_text(-5) == os.strerror(5)


# -----------------------------------------------------------------------------
# engine: the policy with a made-up clock, and both pumps over socketpairs; no root
# -----------------------------------------------------------------------------

MS = 1000                                            # microseconds


def policy_rounds(pol, t, rounds, step=100, answered=0, lost=0, spurious=0, needed=0, late=0,
                  rtt=100):
    """Feed `rounds` identical pump rounds `step` us apart; returns the time after them."""
    for _ in range(rounds):
        t += step
        pol.round(t, answered, answered, answered * rtt, rtt, lost, spurious, needed, late)
    return t


@pytest.mark.engine
def test_policy_random_loss_keeps_the_window():
    """One frame in twenty lost, here and there, among answers: resent, never a cut."""
    pol = aoe.PathPolicy(16, 0)
    t = policy_rounds(pol, 0, 50, answered=16)
    for _ in range(200):
        t = policy_rounds(pol, t, 1, answered=18, lost=1)
        t = policy_rounds(pol, t, 1, answered=2, needed=1)   # the resend's answer
    assert pol.window == 16 and pol.cuts == 0 and pol.loss < aoe.LOSS_CONGESTED
    assert pol.rto_us == aoe.MIN_RTO_US               # no back-off either


@pytest.mark.engine
def test_policy_reordering_and_jitter_keep_the_window():
    """A target that reorders and jitters: frames given up in every round and answered
    after all (spurious), besides one real loss in twenty: no cut, and the reorder
    window widens."""
    pol = aoe.PathPolicy(64, 0)
    t = policy_rounds(pol, 0, 20, answered=32, rtt=1500)
    for _ in range(300):
        t = policy_rounds(pol, t, 1, answered=12, lost=6, rtt=1500)
        t = policy_rounds(pol, t, 1, answered=8, spurious=5, needed=1, rtt=1500)
    assert pol.window == 64 and pol.cuts == 0 and pol.loss < aoe.LOSS_CONGESTED
    assert pol.reorder_factor > 1


@pytest.mark.engine
def test_policy_silence_halves_once_per_timeout_and_backs_off():
    pol = aoe.PathPolicy(16, 0)
    t = policy_rounds(pol, 0, 10, answered=16)
    rto = pol.rto_us
    t += rto + 1                                      # nothing answered for a whole timeout
    t = policy_rounds(pol, t, 1, lost=16)
    assert (pol.window, pol.ssthresh, pol.rto_us, pol.cuts) == (8, 8, 2 * rto, 1)
    # more losses in the same episode: no more cuts
    t = policy_rounds(pol, t, 5, step=10, lost=1)
    assert (pol.window, pol.cuts) == (8, 1)
    t = policy_rounds(pol, t + pol.rto_us, 1, lost=1)   # the next episode, still silent
    assert (pol.window, pol.rto_us, pol.cuts) == (4, 4 * rto, 2)


@pytest.mark.engine
def test_policy_congestion_halves_the_window():
    """Four answers in ten only to resends while answers still come: the target or a switch
    overflows.  The window is halved once the estimate passes a quarter, once per timeout."""
    pol = aoe.PathPolicy(16, 0)
    t = policy_rounds(pol, 0, 10, answered=16)
    t = policy_rounds(pol, t, 4, answered=10, needed=4, lost=6)
    assert pol.window == 16 and pol.cuts == 0         # a burst is not yet congestion
    t = policy_rounds(pol, t, 6, answered=10, needed=4, lost=6)
    assert pol.loss > aoe.LOSS_CONGESTED
    assert pol.window == 8 and pol.cuts == 1


@pytest.mark.engine
def test_policy_spurious_resends_undo_the_cut():
    pol = aoe.PathPolicy(16, 0)
    t = policy_rounds(pol, 0, 10, answered=16)
    rto = pol.rto_us
    t = policy_rounds(pol, t + rto + 1, 1, lost=16)   # a stall: every frame given up
    assert pol.window == 8
    t = policy_rounds(pol, t, 1, answered=16, spurious=16)   # ... and every one answered after all
    assert (pol.window, pol.ssthresh, pol.rto_us, pol.undone) == (16, 16, rto, 1)


@pytest.mark.engine
def test_policy_a_needed_resend_keeps_the_cut():
    pol = aoe.PathPolicy(16, 0)
    t = policy_rounds(pol, 0, 10, answered=16)
    t = policy_rounds(pol, t + pol.rto_us + 1, 1, lost=16)
    t = policy_rounds(pol, t, 1, answered=2, needed=1)        # one loss was real
    t = policy_rounds(pol, t, 1, answered=3, spurious=3)
    assert pol.undone == 0 and pol.window < 16
    t = policy_rounds(pol, t, 1, late=1)                      # ... no: its first answer came, late
    assert pol.undone == 1 and pol.window == 16


@pytest.mark.engine
def test_policy_grows_back_by_slow_start_then_one_per_window():
    pol = aoe.PathPolicy(32, 0)
    t = policy_rounds(pol, 0, 10, answered=32)
    t = policy_rounds(pol, t + pol.rto_us + 1, 1, lost=32)
    # silent for two episodes: 32 -> 16 -> 8
    t = policy_rounds(pol, t + pol.rto_us + 1, 1, lost=16)
    assert (pol.window, pol.ssthresh) == (8, 8)
    pol.ssthresh = 16                                         # as if cut once from 32
    t = policy_rounds(pol, t, 1, answered=5)
    assert pol.window == 13                                   # slow start: one more per answer
    t = policy_rounds(pol, t, 1, answered=5)
    assert pol.window == 16                                   # ... up to ssthresh
    t = policy_rounds(pol, t, 1, answered=15)
    assert pol.window == 16
    t = policy_rounds(pol, t, 1, answered=1)
    assert pol.window == 17                                   # then one per window of answers


@pytest.mark.engine
def test_policy_reorder_window_widens_on_spurious_and_narrows_again():
    pol = aoe.PathPolicy(16, 0)
    t = policy_rounds(pol, 0, 30, answered=16, rtt=2000)
    base = pol.reorder_us
    assert base == max(aoe.MIN_REORDER_US, int(pol.srtt / 4)) and base < pol.rto_us
    t = policy_rounds(pol, t, 2, answered=16, spurious=1, rtt=2000)
    assert pol.reorder_us == min(pol.rto_us, 4 * base)
    t = policy_rounds(pol, t, aoe.REORDER_SHRINK_AFTER, answered=16, needed=1, rtt=2000)
    assert pol.reorder_us == min(pol.rto_us, 2 * base)


class PairPort(aoe.Port):
    """One end of a datagram socketpair standing in for an interface's AoE socket; its
    twins (each attached device's own) are duplicates of that end."""

    def __init__(self, sock, mac):
        self.sock, self.mac, self.name, self.buf = sock, mac, "pair", bytearray(65536)
        self.ifc = types.SimpleNamespace(mtu=9000, name="pair")

    def twin(self):
        return PairPort(self.sock.dup(), self.mac)


def lab_target(ports, macs, sectors=4096, bufcnt=8, spf=2, shelf=3, slot=7):
    """A Target as discovery would make it, reached through `ports` (one path each)."""
    t = aoe.Target(shelf, slot, aoe.ConfigInfo(bufcnt=bufcnt, scnt=spf))
    for port, mac in zip(ports, macs):
        t.add_path(port, mac)
    t.identify = aoe.Identify(aoe.build_identify(sectors, "m", "s", "f"))
    return t


@pytest.mark.engine
def test_engine_fails_after_deadsecs_of_silence_not_before():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        now = [0]
        engine = aoe.Engine(lab_target([PairPort(ours, MAC_I)], [MAC_T]), deadsecs=5,
                            clock=lambda: now[0])
        rid = engine.submit(aoe.OP_READ, 0, 1, bytearray(512))
        for second in range(5):
            now[0] = second * 1000000 + 999999
            assert engine.poll(0) == [] and not engine.dead
        now[0] = 5000001
        assert engine.poll(0) == [(rid, -errno.ETIMEDOUT)]
        assert "no answer for 5 s" in engine.dead
        with pytest.raises(aoe.AoeError):
            engine.submit(aoe.OP_READ, 0, 1, bytearray(512))
        assert theirs.recv(100)[:14] == MAC_T + MAC_I + b"\x88\xa2"   # it did ask


@pytest.mark.engine
@pytest.mark.parametrize("kind", ["python", "helper"])
def test_patient_engine_waits_for_a_slow_answer_before_sending_again(kind):
    """Engine.be_patient, as rescue uses it: a read the target is slow to answer is not sent
    again before the patience asked for — while nothing newer is answered (a single-threaded
    target busy with it), and, with both floors, while newer reads are answered — then it is.
    Without patience the policy's own timeout, far shorter, sends it again at once."""
    helper = aoe.load_helper() if kind == "helper" else None
    need(kind == "python" or helper is not None, "needs the compiled helper: python3 build_ffi.py")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        engine = aoe.Engine(lab_target([PairPort(ours, MAC_I)], [MAC_T]), helper=helper)
        target = ScriptedTarget(theirs)

        def sent_within(seconds, answer=()):
            """Poll for `seconds`, answering the first sending seen of each LBA in `answer`
            at once; the LBAs of every frame the target got, in order."""
            lbas, end = [], time.monotonic() + seconds
            while time.monotonic() < end:
                engine.poll(2000)
                for r in target.requests():
                    lbas.append(aoe.parse_ata(aoe.parse_frame(r)).lba)
                    if lbas[-1] in answer and lbas.count(lbas[-1]) == 1:
                        target.send(target.answer(r))
            return lbas

        for lba in range(40, 56, 2):                  # round trips learned: a short timeout
            engine.submit(aoe.OP_READ, lba, 2, bytearray(1024))
            sent_within(0.02, answer=[lba])
        assert engine.policy[0].rto_us < 100000, engine.policy[0].rto_us
        # silent: only the floor of the timeout sends it again
        engine.be_patient(600000)
        engine.submit(aoe.OP_READ, 0, 2, bytearray(1024))
        assert sent_within(0.4) == [0]
        assert sent_within(3, answer=[0])[:1] == [0]
        # newer reads answered: sent again soon, unless the second floor holds it too
        engine.be_patient(600000, 600000)
        engine.submit(aoe.OP_READ, 10, 2, bytearray(1024))
        engine.submit(aoe.OP_READ, 12, 2, bytearray(1024))
        assert sent_within(0.4, answer=[12]) == [10, 12]
        assert sent_within(3, answer=[10])[:1] == [10]
        engine.be_patient(0, 0)
        engine.submit(aoe.OP_READ, 20, 2, bytearray(1024))
        engine.submit(aoe.OP_READ, 22, 2, bytearray(1024))
        assert sent_within(0.4, answer=[22]).count(20) >= 2


def sector_data(lba, count):
    return b"".join(struct.pack(">Q", lba + i) * 64 for i in range(count))


class ScriptedTarget:
    """The far end of a pump's socketpair: reads its requests, answers as told."""

    def __init__(self, sock):
        self.sock = sock

    def requests(self):
        frames = []
        while True:
            try:
                frames.append(self.sock.recv(70000, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return frames

    @staticmethod
    def answer(request, data=None, tag=None, src=MAC_T, shelf=3, flags=aoe.AOEFL_RSP, lba=None,
               count=0, aflags=None, status=aoe.ATA_DRDY, err=0):
        """The answer to `request`, right unless told otherwise."""
        f = aoe.parse_frame(request)
        a = aoe.parse_ata(f)
        if data is None:
            data = (b"" if a.aflags & aoe.AOEAFL_WRITE or not a.count
                    else sector_data(a.lba, a.count))
        reply = aoe.AtaFields(a.aflags if aflags is None else aflags, err, count, status,
                              a.lba if lba is None else lba, data)
        return aoe.pack_ata(f.src, src, shelf, 7, f.tag if tag is None else tag, reply, flags)

    def send(self, frame):
        self.sock.send(frame)


def retag(tag):
    """A tag with its parity bit set right again (a forgery that passes the parity check)."""
    tag &= ~1
    return tag | (bin(tag).count("1") & 1)


def pump_for(kind, sock, seed=7):
    if kind == "helper":
        helper = aoe.load_helper()
        need(helper is not None, "needs the compiled helper: python3 build_ffi.py")
        pump = aoe.HelperPump(aoe.CompiledEngine(helper, 3, 7, seed, frames=64), True, 2)
    else:
        # small: forged tags name slots past the end
        pump = aoe.PyPump(3, 7, True, 2, seed, frames=64)
    pump.add_path(PairPort(sock, MAC_I), MAC_T)
    path = pump.paths[0]
    # nothing expires unless told
    path.maxout, path.rto_us, path.reorder_us = 8, 60000000, 60000000
    return pump


def pump_script(kind):
    """Requests and hostile answers, the same for either pump; returns what the pump made of
    them and every frame it sent."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        pump, target = pump_for(kind, ours), ScriptedTarget(theirs)
        done, expired, sent = [], [], []

        def requests():
            """What the pump sent since last asked."""
            frames = target.requests()
            sent.extend(frames)
            return frames

        def rounds(frames=()):
            """Send frames to the pump, a few at a time (a socketpair queues only ten), pumping."""
            frames = list(frames)
            for i in range(0, max(1, len(frames)), 6):
                for frame in frames[i:i + 6]:
                    target.send(frame)
                d, e = pump.pump(0)
                done.extend(d)
                expired.extend(e)

        bufs = {1: bytearray(8 * 512), 2: bytearray(4 * 512)}
        pump.submit(1, aoe.OP_READ, 100, 8, bufs[1])          # four frames
        pump.submit(2, aoe.OP_READ, 200, 4, bufs[2])          # two
        pump.submit(3, aoe.OP_WRITE, 300, 4, sector_data(300, 4))   # two
        pump.submit(4, aoe.OP_FLUSH, 0, 0, None)              # one, once the window has room
        rounds()
        reqs = requests()
        # the window
        assert [(a.lba, a.count) for a in (aoe.parse_ata(aoe.parse_frame(r)) for r in reqs)] == \
            [(100, 2), (102, 2), (104, 2), (106, 2), (200, 2), (202, 2), (300, 2), (302, 2)]
        tag = [aoe.parse_frame(r).tag for r in reqs]
        rounds([
            # one tag bit flipped: bad_tag
            target.answer(reqs[0], tag=tag[0] ^ 1 << 17),
            # the next generation: stale
            target.answer(reqs[0], tag=retag(tag[0] + (1 << 16))),
            # another MAC: bad_mac
            target.answer(reqs[0], src=MAC_I),
            # too little data: short
            target.answer(reqs[0], data=sector_data(100, 1)),
            # frame 1's answer, 0's tag: echo
            target.answer(reqs[1], tag=tag[0]),
            # the wrong LBA echoed: echo
            target.answer(reqs[0], lba=102),
            # more sectors than asked: echo
            target.answer(reqs[0], count=3),
            # a write's echo: echo
            target.answer(reqs[0], aflags=aoe.AOEAFL_EXT | aoe.AOEAFL_WRITE),
            # another target: foreign
            target.answer(reqs[0], shelf=4),
            # not an answer: not_response
            target.answer(reqs[0], flags=0),
            # stale
            target.answer(reqs[0], data=b"\xee" * 1024, tag=retag(0xC0000000 | 12345 << 1)),
        ] + [target.answer(reqs[i]) for i in (0, 1, 2, 3, 4, 6)]         # 5 and 7 stay unanswered
          + [target.answer(reqs[0])])                                      # a duplicate: stale
        marks = [sorted(done), len(expired)]
        flush = requests()
        assert [aoe.parse_ata(aoe.parse_frame(r)).cmd_status for r in flush] == \
            [aoe.ATA_CMD_FLUSH_EXT]
        pump.paths[0].rto_us = 0                              # 5, 7 and the flush expire ...
        rounds()
        # ... and are resent, in order, as Engine does
        for slot in reversed(expired):
            pump.resend(slot)
        pump.paths[0].rto_us = 60000000
        marks += [len(expired)]
        rounds()
        again = requests()
        assert [aoe.parse_ata(aoe.parse_frame(r)).lba for r in again] == [202, 302, 0]
        # the first transmission answers: spurious
        rounds([target.answer(reqs[5]),
                target.answer(again[1]),                     # the resend answers: needed
                target.answer(again[0]),                     # the resend of the spurious one: stale
                target.answer(again[2], status=aoe.ATA_DRDY | aoe.ATA_ERR, err=aoe.ATA_ABORTED)])
        marks += [sorted(done)]
        # the one a resend completed, late: late
        rounds([target.answer(reqs[7])])
        # the reorder clause: a frame sent before one that was answered is lost after
        # reorder_us, long before rto_us; one sent after it is not
        bufs.update({5: bytearray(512), 6: bytearray(512), 7: bytearray(512)})
        for rid in (5, 6, 7):
            pump.submit(rid, aoe.OP_READ, 400 + rid, 1, bufs[rid])
            rounds()
            time.sleep(0.002)                             # each sent at a later microsecond
        first, middle, last = requests()
        pump.paths[0].reorder_us = 1000
        rounds([target.answer(middle)])
        time.sleep(0.002)
        rounds()
        marks += [sorted(done)[-1:], len(expired)]        # 6 done, 5 lost, 7 waits
        rounds([target.answer(first), target.answer(last)])
        marks += [sorted(done)[-3:]]
        # the helper's own way of receiving (straight into the buffer) is counted apart
        nonzero = lambda counts: {k: v for k, v in counts.items()
                                  if v and k not in ("send_eagain", "frames_in_place")}
        return (marks, nonzero(pump.drops), nonzero(pump.stats), bytes(bufs[1]), bytes(bufs[2]),
                pump.busy, sent)


@pytest.mark.engine
@pytest.mark.parametrize("order", ["in order", "reversed", "pairs swapped", "forged among them"])
def test_helper_receives_read_answers_straight_into_the_buffer(order):
    """The helper aims each receive at the frame it expects next, so data in order lands
    in the request's buffer with no copy; answers out of order, forged or duplicated in
    the same batch (a forgery written into a frame's buffer before that frame's true
    answer is handled) still leave every frame its own data."""
    helper = aoe.load_helper()
    need(helper is not None, "needs the compiled helper: python3 build_ffi.py")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        pump, target = pump_for("helper", ours), ScriptedTarget(theirs)
        buf = bytearray(16 * 512)
        pump.submit(1, aoe.OP_READ, 100, 16, buf)                 # eight frames of two sectors
        done = list(pump.pump(0)[0])
        reqs = target.requests()
        assert len(reqs) == 8
        true = [target.answer(r) for r in reqs]
        forged = lambda i: target.answer(reqs[i], lba=999, data=b"\xee" * 1024)   # echo: dropped
        answers = {"in order": true,
                   "reversed": true[::-1],
                   "pairs swapped": [true[i ^ 1] for i in range(8)],
                   "forged among them": [forged(0), true[1], forged(1), true[0], true[2], forged(3)]
                                        + true[3:] + [true[0]]}[order]
        for i in range(0, len(answers), 6):           # a socketpair queues only ten
            for frame in answers[i:i + 6]:
                target.send(frame)
            done.extend(pump.pump(0)[0])
        assert done == [(1, 0)]
        assert bytes(buf) == sector_data(100, 16)
        in_place = pump.stats["frames_in_place"]
        assert in_place == 8 if order == "in order" else in_place < 8


@pytest.mark.engine
def test_helper_and_aoe_py_share_one_definition(monkeypatch):
    """The helper's constants, path fields and counters agree with aoe.py's, and a
    disagreement (a helper built from another _aoeio.c) is found and the helper refused."""
    helper = aoe.load_helper()
    need(helper is not None, "needs the compiled helper: python3 build_ffi.py")
    assert aoe.helper_mismatch(helper) == []
    monkeypatch.setattr(aoe, "GEN_MAX", aoe.GEN_MAX - 1)
    monkeypatch.setattr(aoe, "PUMP_DROPS", aoe.PUMP_DROPS + ("misrouted",))
    problems = aoe.helper_mismatch(helper)
    assert any(p.startswith("GEN_MAX is 16383 in the helper") for p in problems), problems
    assert "struct aoe_counters lacks drop_misrouted" in problems
    import build_ffi
    cdef = build_ffi.cdef_from(open(os.path.join(HERE, "_aoeio.c")).read())
    assert "#define TAG_ENGINE ..." in cdef and "private" not in cdef and "paths[...]" in cdef
    with pytest.raises(Exception, match="no ABI-BEGIN"):
        build_ffi.cdef_from("int f(void);")


@pytest.mark.engine
def test_request_ids_are_made_and_read_alike_by_the_helper_and_aoe_py():
    """The helper's bridges make request ids and aoe.py reads them back (and makes the nbd
    bridge's itself): both sides encode alike and decode every id alike, the edges of each
    field, the other layouts' ids and ids with one stray bit included."""
    helper = aoe.load_helper()
    need(helper is not None, "needs the compiled helper: python3 build_ffi.py")
    lib, ublk_bridge, nbd_bridge = helper.lib, aoe.UblkBridge, aoe.NbdBridge
    ublk = [(op, tag) for op in (0, 1, 2, 5, 0xFF) for tag in (0, 1, 0x7FFF, 0xFFFF)]
    nbd = [(op, slot) for op in (aoe.OP_READ, aoe.OP_WRITE, aoe.OP_FLUSH, 0xFF)
           for slot in (0, 1, 0xFFFF, 0xFFFFFFFF)]
    ids = [ublk_bridge.request_id(op, tag) for op, tag in ublk]
    ids += [nbd_bridge.request_id(op, slot) for op, slot in nbd]
    assert ids == [lib.ublk_request_id(op, tag) for op, tag in ublk] + \
        [lib.nbd_request_id(op, slot) for op, slot in nbd]
    ids += [aoe.PROBE_REQ, 0, 1, 0xFFFF, 0xFFFFFFFF, 2 ** 64 - 1, aoe.BRIDGE_ID | aoe.NBD_ID]
    ids += [rid ^ 1 << bit for rid in ids[:len(ublk) + len(nbd)] for bit in (24, 40, 63)]
    for rid in ids:
        as_ublk = (lib.ublk_request_op(rid), lib.ublk_request_tag(rid))
        as_nbd = (lib.nbd_request_op(rid), lib.nbd_request_slot(rid))
        assert ublk_bridge.request_of(rid) == (as_ublk if lib.is_ublk_request_id(rid) else None)
        assert nbd_bridge.request_of(rid) == (as_nbd if lib.is_nbd_request_id(rid) else None)
    assert [ublk_bridge.request_of(ublk_bridge.request_id(*u)) for u in ublk] == ublk
    assert [nbd_bridge.request_of(nbd_bridge.request_id(*n)) for n in nbd] == nbd
    assert ublk_bridge.request_of(aoe.PROBE_REQ) is None is nbd_bridge.request_of(aoe.PROBE_REQ)


@pytest.mark.engine
def test_both_pumps_have_one_public_surface():
    """The Engine drives PyPump and HelperPump alike: the two offer exactly the same public
    members (the helper's bridges and its spin live elsewhere)."""
    helper = aoe.load_helper()
    need(helper is not None, "needs the compiled helper: python3 build_ffi.py")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        pumps = [pump_for("python", ours), pump_for("helper", ours)]
        public = [{name for name in dir(pump) if not name.startswith("_")} for pump in pumps]
        assert public[0] == public[1]
        assert {"submit", "pump", "paths", "flush_cmd", "failed", "stats", "close"} <= public[0]
        for pump in pumps:
            pump.close()


@pytest.mark.engine
@pytest.mark.parametrize("kind", ["python", "helper"])
def test_engine_names_the_frames_the_target_failed_and_keeps_the_others(kind):
    """A read of four frames whose second and fourth the target fails (ABRT, then UNC) ends
    with the first failure's status; failed_frames names exactly those frames with what the
    target said, and the other two frames' data is in the buffer.  The answers come one per
    poll, so the request's failures are gathered over several polls."""
    helper = aoe.load_helper() if kind == "helper" else None
    if kind == "helper":
        need(helper is not None, "needs the compiled helper: python3 build_ffi.py")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        engine = aoe.Engine(lab_target([PairPort(ours, MAC_I)], [MAC_T], bufcnt=8),
                            helper=helper)
        target, buf = ScriptedTarget(theirs), bytearray(8 * 512)
        rid = engine.submit(aoe.OP_READ, 100, 8, buf)
        errors = {102: aoe.ATA_ABORTED, 106: aoe.ATA_UNC}
        done, deadline = [], time.monotonic() + 10
        requests = []
        while not done and time.monotonic() < deadline:
            requests += target.requests()
            if requests:                          # the failures first, one answer a poll
                request = max(requests, key=lambda r: aoe.parse_ata(aoe.parse_frame(r)).lba
                              in errors)
                requests.remove(request)
                lba = aoe.parse_ata(aoe.parse_frame(request)).lba
                err = errors.get(lba, 0)
                target.send(target.answer(request, err=err, data=b"" if err else None,
                                          status=aoe.ATA_DRDY | (aoe.ATA_ERR if err else 0)))
            done = engine.poll(2000)
        bad = -(aoe.STATUS_ATA_ERROR | aoe.ATA_ABORTED)
        assert done == [(rid, bad)]
        assert engine.failed_frames(rid) == [
            (102, 2, bad), (106, 2, -(aoe.STATUS_ATA_ERROR | aoe.ATA_UNC))]
        assert engine.failed_frames(rid) == []                  # taken
        assert buf[:1024] == sector_data(100, 2) and buf[2048:3072] == sector_data(104, 2)
        engine.close()


@pytest.mark.engine
def test_ublk_failed_read_completes_up_to_its_first_failed_frame():
    """ublk: a READ the target failed in part is completed with its bytes before the first
    failed frame (ublk_drv sends the rest again), a bridged one from its descriptor's start;
    -EIO when that is nothing, unknown (no failed frames named, a tag the queue lacks) or the
    request is not a READ."""
    abrt = -(aoe.STATUS_ATA_ERROR | aoe.ATA_ABORTED)
    read, write = aoe.UBLK_IO_OP_READ, aoe.UBLK_IO_OP_WRITE
    bridged = aoe.UblkBridge.request_id
    failed = {3: [(137, 17, abrt), (120, 17, abrt)], bridged(read, 7): [(1034, 17, abrt)],
              4: [(100, 17, abrt)], 5: [(150, 2, abrt)], bridged(read, 9): [(5000, 1, abrt)],
              bridged(write, 8): [(1017, 17, abrt)]}
    backend = aoe.UblkBackend.__new__(aoe.UblkBackend)
    backend.host = types.SimpleNamespace(target=types.SimpleNamespace(name="e1.2"))
    backend.engine = types.SimpleNamespace(dead=None, fall_back_flush=lambda status: False,
                                           failed_frames=lambda rid: sorted(failed.pop(rid, ())))
    backend.lib = types.SimpleNamespace(     # the kernel's descriptors: tags 7 and 8 only
        ublk_queue_start_sector=lambda queue, tag: {7: 1000, 8: 1000}.get(tag, 2 ** 64 - 1))
    backend.queue, backend.results, logged = object(), [], []
    backend.log = logged.append
    backend.inflight = {3: (read, 64 * 512, 100), 4: (read, 64 * 512, 100),
                        5: (write, 64 * 512, 100), 6: (read, 64 * 512, 100)}
    for rid in (3, bridged(read, 7), 4, 5, 6, bridged(read, 9), bridged(write, 8)):
        backend.completed(rid, abrt)
    assert backend.results == [(3, 20 * 512), (7, 34 * 512), (4, -errno.EIO), (5, -errno.EIO),
                               (6, -errno.EIO), (9, -errno.EIO), (8, -errno.EIO)]
    assert not failed and not backend.inflight
    assert logged[0].endswith("; a read at sector 100, completed up to 120") and len(logged) == 7


@pytest.mark.engine
@pytest.mark.parametrize("readonly", [False, True])
def test_ublk_bridge_admits_only_what_python_would_submit(readonly):
    """The helper's ublk bridge submits a request itself exactly when UblkBackend._start,
    which gets every request the bridge hands over, would send it to the engine, and as
    the same request: every opcode, read-only or not, empty, at the end, past it, and
    ranges whose end overflows."""
    helper = aoe.load_helper()
    need(helper is not None, "needs the compiled helper: python3 build_ffi.py")
    ffi, sectors = helper.ffi, 64
    ops = (aoe.UBLK_IO_OP_READ, aoe.UBLK_IO_OP_WRITE, aoe.UBLK_IO_OP_FLUSH,
           aoe.UBLK_IO_OP_DISCARD, aoe.UBLK_IO_OP_WRITE_ZEROES, 0xFF)
    ranges = [(0, 0), (0, 1), (0, sectors), (sectors - 1, 1), (sectors - 1, 2), (sectors, 0),
              (sectors, 1), (sectors + 1, 1), (2 ** 64 - 1, 2), (1, 2 ** 32 - 1)]
    tag_memory = ffi.new("char[]", sectors * aoe.SECTOR_SIZE)
    tag_buf = ffi.cast("char *", tag_memory)          # as the queue's: ranges are not its own
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        for op in ops:
            for start, count in ranges:
                r = ffi.new("struct ublk_req *", {"tag": 3, "op": op, "nr_sectors": count,
                                                  "start_sector": start})
                bridged = helper.lib.ublk_bridge_op(r, sectors, readonly)
                engine = aoe.Engine(lab_target([PairPort(ours, MAC_I)], [MAC_T], sectors=sectors))
                submitted = []
                engine.pump.submit = lambda rid, *request: submitted.append(request) or 0
                backend = aoe.UblkBackend.__new__(aoe.UblkBackend)
                backend.host = types.SimpleNamespace(up=True, readonly=readonly)
                backend.engine, backend.ffi, backend.tag_buf = engine, ffi, {3: tag_buf}
                backend.results, backend.inflight, backend.log = [], {}, lambda line: None
                backend._start(r[0])
                flush = bridged == aoe.OP_FLUSH
                expected = [] if bridged < 0 else [(bridged, 0 if flush else start,
                                                    0 if flush else count)]
                assert [request[:3] for request in submitted] == expected, (op, start, count)


@pytest.mark.engine
@pytest.mark.parametrize("kind", ["python", "helper"])
def test_a_tag_of_generation_0_answers_nothing(kind):
    """Generations run 1..GEN_MAX and wrap: a tag whose generation field is 0 names no
    transmission, even for a frame last sent as generation GEN_MAX (which 0 would pass for in
    arithmetic modulo GEN_MAX)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        pump, target = pump_for(kind, ours, seed=aoe.GEN_MAX - 2), ScriptedTarget(theirs)
        buf = bytearray(512)
        pump.submit(1, aoe.OP_READ, 100, 1, buf)
        pump.pump(0)
        request, = target.requests()
        tag = aoe.parse_frame(request).tag
        assert tag >> 16 & aoe.GEN_MAX == aoe.GEN_MAX              # the first transmission
        target.send(target.answer(request, tag=retag(tag & ~(aoe.GEN_MAX << 16)),
                                  data=b"\xee" * 512))
        done, _ = pump.pump(0)
        assert done == [] and pump.drops["stale"] == 1
        target.send(target.answer(request))
        done, _ = pump.pump(0)
        assert done == [(1, 0)] and bytes(buf) == sector_data(100, 1)


@pytest.mark.engine
def test_pumps_agree_and_take_only_true_answers():
    """PyPump and HelperPump, fed the same requests and the same hostile answers
    (corrupted, stale, duplicate, late, misdirected, short, another MAC or target),
    complete the same requests with the right data, count every drop alike, send the same
    bytes, and give up the same frames as lost (after rto_us, and after reorder_us once a
    frame sent later was answered)."""
    results = {kind: pump_script(kind) for kind in ("python", "helper")}
    assert results["python"] == results["helper"]
    marks, drops, counters, buf1, buf2, busy, sent = results["python"]
    flush_failed = -(aoe.STATUS_ATA_ERROR | aoe.ATA_ABORTED)
    assert marks == [[(1, 0)], 0, 3, [(1, 0), (2, 0), (3, 0), (4, flush_failed)],
                     [(6, 0)], 4, [(5, 0), (6, 0), (7, 0)]]
    assert buf1 == sector_data(100, 8) and buf2 == sector_data(200, 4)
    assert drops == {"bad_tag": 1, "stale": 4, "late": 1, "bad_mac": 1, "short": 1, "echo": 4,
                     "foreign": 1, "not_response": 1}
    assert counters == {"frames_sent": 15, "frames_resent": 3, "frames_recv": 12,
                        "bytes_data": 8 * 1024 + 3 * 512, "resent_needed": 2,
                        "resent_spurious": 1, "errors": 1}
    assert not busy

@pytest.mark.engine
def test_helper_pump_spins_only_for_fast_paths_and_still_takes_only_true_answers():
    """The engine has the helper's pump poll before sleeping only while a path answers
    within SPIN_RTT_US (for a lone bridged request: a few round trips, capped); a spinning
    pump still takes only true answers, and gives up its wait at the timeout when nothing
    comes."""
    helper = aoe.load_helper()
    need(helper is not None, "needs the compiled helper: python3 build_ffi.py")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        engine = aoe.Engine(lab_target([PairPort(ours, MAC_I)], [MAC_T]), helper=helper)
        pol, path = engine.policy[0], engine.pump.paths[0]
        assert engine.spin_for() == (0, 0)                # no round trip known yet
        pol.srtt = aoe.SPIN_RTT_US
        assert engine.spin_for() == (aoe.SPIN_US, aoe.LONE_SPIN_RTTS * aoe.SPIN_RTT_US)
        path.enabled = 0
        assert engine.spin_for() == (0, 0)                # only paths in use count
        path.enabled, pol.srtt = 1, aoe.SPIN_RTT_US + 1
        assert engine.spin_for() == (0, aoe.LONE_SPIN_RTTS * (aoe.SPIN_RTT_US + 1))
        pol.srtt = 100 * aoe.LONE_SPIN_MAX_US
        assert engine.spin_for() == (0, aoe.LONE_SPIN_MAX_US)   # a slow target: capped

        pump, target = engine.pump, ScriptedTarget(theirs)
        engine.compiled.set_spin(aoe.SPIN_US, 0)
        path.rto_us = path.reorder_us = 60000000
        buf = bytearray(4 * 512)
        pump.submit(1, aoe.OP_READ, 40, 4, buf)
        t0 = time.monotonic()
        assert pump.pump(30000) == ([], [])               # spins, then sleeps out the timeout
        waited = time.monotonic() - t0
        assert 0.025 <= waited < 5
        first, second = target.requests()

        def answer_later():
            time.sleep(0.002)
            theirs.send(target.answer(first, lba=999, data=sector_data(999, 2)))  # echo
            theirs.send(target.answer(first, tag=aoe.parse_frame(first).tag ^ 1 << 18))
            theirs.send(target.answer(first))
            theirs.send(target.answer(second))

        answering = threading.Thread(target=answer_later)
        answering.start()
        done = []
        for _ in range(100):
            done += pump.pump(20000)[0]
            if done:
                break
        answering.join()
        assert done == [(1, 0)]
        assert buf == sector_data(40, 4)
        assert pump.drops["bad_tag"] == 1 and pump.drops["echo"] == 1


NBD_DISK_SECTORS = 2048


def nbd_requests(rng, count=1000):
    """A kernel's stream of NBD requests (reads, writes, flushes, FUA writes, and some that
    must fail: unaligned, past the end, an unknown command, a write past the end larger than
    any request buffer, whose data is read and dropped) and what each expects."""
    sent, expected = bytearray(), {}
    for i in range(count):
        handle = struct.pack(">Q", i)
        kind = rng.choice([aoe.NBD_CMD_READ] * 4 + [aoe.NBD_CMD_WRITE, aoe.NBD_CMD_FLUSH,
                                                    aoe.NBD_CMD_WRITE | aoe.NBD_CMD_FLAG_FUA])
        lba, count = rng.randrange(1024), rng.choice([1, 1, 1, 8, 64, 256])
        count = min(count, NBD_DISK_SECTORS - lba)
        length = 0 if kind == aoe.NBD_CMD_FLUSH else count * 512
        offset, error = lba * 512, 0
        if rng.random() < 0.03:
            kind, where = rng.choice([(aoe.NBD_CMD_READ, "unaligned"),
                                      (aoe.NBD_CMD_WRITE, "unaligned"), (4, "unknown"),
                                      (aoe.NBD_CMD_READ, "past the end"),
                                      (aoe.NBD_CMD_WRITE, "past the end, 1 MiB")])
            length, error = count * 512, errno.EINVAL
            if where == "past the end":
                offset = NBD_DISK_SECTORS * 512
            elif where == "past the end, 1 MiB":
                offset, length = (NBD_DISK_SECTORS - 8) * 512, 1 << 20
            elif where == "unaligned":
                offset += 100
        sent += aoe.NBD_REQUEST.pack(aoe.NBD_REQUEST_MAGIC, kind, handle, offset, length)
        if kind & 0xFFFF == aoe.NBD_CMD_WRITE:
            data = seeded_bytes(rng, length)
            sent += data
            expected[handle] = (kind, lba, data, error)
        else:
            expected[handle] = (kind, lba, length, error)
    return sent, expected


NBD_CUTS = (1, 7, 28, 100, 4096, 70000, 300000)


def play_nbd_kernel(rng, kernel, sent, expected, serve_round, cuts=NBD_CUTS):
    """Send the stream cut anywhere (headers too), serving a round after each piece, and
    read the answers as the kernel's receiving side does; returns the answers' bytes."""
    answers = bytearray()
    total = sum(aoe.NBD_REPLY.size + (what if kind == aoe.NBD_CMD_READ and not error else 0)
                for kind, _, what, error in expected.values())
    kernel.settimeout(20)

    def read_answers():
        while len(answers) < total:
            got = kernel.recv(1 << 20)
            if not got:
                break
            answers.extend(got)
    reader = threading.Thread(target=read_answers, daemon=True)
    reader.start()
    sender = kernel.dup()                         # the sending side never waits
    sender.setblocking(False)
    at, deadline = 0, time.monotonic() + 60
    while (at < len(sent) or len(answers) < total) and time.monotonic() < deadline:
        cut = rng.choice(cuts)
        if at < len(sent):
            with contextlib.suppress(BlockingIOError):  # full while requests pile up
                at += sender.send(sent[at:at + cut])
        serve_round(at >= len(sent))
    reader.join(10)
    sender.close()
    assert len(answers) == total
    return answers


def check_nbd_answers(answers, expected, original, disk):
    """Every request answered once, with its error or its data; reads see the writes before
    them; the disk holds the writes in order."""
    replies, pos = {}, 0
    while pos < len(answers):
        magic, error, handle = aoe.NBD_REPLY.unpack_from(answers, pos)
        pos += aoe.NBD_REPLY.size
        kind, lba, what, wanted = expected[handle]
        assert magic == aoe.NBD_REPLY_MAGIC and error == wanted and handle not in replies
        length = what if kind == aoe.NBD_CMD_READ and not error else 0
        replies[handle] = (lba, bytes(answers[pos:pos + length]))
        pos += length
    model = bytearray(original)                   # the requests in order, as they were served
    for handle, (kind, lba, what, error) in expected.items():
        if error:
            continue
        if kind & 0xFFFF == aoe.NBD_CMD_WRITE:
            model[lba * 512:lba * 512 + len(what)] = what
        elif kind == aoe.NBD_CMD_READ:
            assert replies[handle] == (lba, bytes(model[lba * 512:lba * 512 + what]))
    assert model == disk
    assert len(replies) == len(expected)


def nbd_host(engine):
    """A backend's host with no daemon behind it: the test serves the rounds itself."""
    def not_here(*args):
        raise AssertionError("the nbd server asked its daemon for more than its host")
    target = types.SimpleNamespace(info=types.SimpleNamespace(bufcnt=16), sectors_per_frame=2)
    return aoe.BackendHost(target, engine, lambda message: None, False, not_here, not_here,
                           not_here)


@pytest.mark.engine
@pytest.mark.parametrize("answer_chance, cuts, count", [(0.3, NBD_CUTS, 1000),
                                                        (1.0, (1, 7, 13, 28, 100, 4096), 300)])
def test_nbd_server_takes_requests_however_the_stream_is_cut(answer_chance, cuts, count):
    """The NBD backend's side of the protocol in Python over a socketpair, the kernel's side
    played here: requests sent whole, many at once and cut anywhere (headers too) all reach
    the engine with their data, and every one is answered once, read data with its answer.
    Answered now and then, requests pile up to the limit and the stream waits; answered
    every round and sent in small pieces, the stream is read as it comes, headers cut between
    two reads."""
    rng = random.Random(11)
    kernel, ours = socket.socketpair()
    original = seeded_bytes(rng, NBD_DISK_SECTORS * 512)
    disk = bytearray(original)
    submitted = []

    class Engine:
        dead = compiled = None
        sectors = NBD_DISK_SECTORS

        def submit(self, op, lba, count, buf, req_id):
            if op != aoe.OP_FLUSH and lba + count > NBD_DISK_SECTORS:
                raise aoe.AoeError("past the end")
            if op == aoe.OP_WRITE:
                disk[lba * 512:(lba + count) * 512] = buf
            elif op == aoe.OP_READ:
                buf[:] = disk[lba * 512:(lba + count) * 512]
            submitted.append((req_id, op, lba, count))

    nbd = aoe.NbdBackend(nbd_host(Engine()), None)
    nbd.sock = ours
    nbd.serve_socket()
    assert isinstance(nbd.server, aoe.NbdStream)
    sent, expected = nbd_requests(rng, count)
    done = [0]

    def serve_round(all_sent):
        assert nbd.intake()
        if rng.random() < answer_chance or all_sent:   # else requests pile up, and the stream
            for req_id, op, lba, count in submitted[done[0]:]:
                nbd.completed(req_id, 0)
                done[0] += 1
            nbd.intake()
    answers = play_nbd_kernel(rng, kernel, sent, expected, serve_round, cuts)
    check_nbd_answers(answers, expected, original, disk)
    ops = collections.Counter(op for _, op, _, _ in submitted)
    good = [k for k, _, _, error in expected.values() if not error]
    fua = sum(1 for k in good if k & aoe.NBD_CMD_FLAG_FUA)
    assert ops[aoe.OP_FLUSH] == good.count(aoe.NBD_CMD_FLUSH) + fua
    assert ops[aoe.OP_WRITE] == sum(1 for k in good if k & 0xFFFF == aoe.NBD_CMD_WRITE)
    kernel.close()
    ours.close()


@contextlib.contextmanager
def socketpair_target(tmp_path, bufcnt=16):
    """serve's AoeTarget e3.7 on a datagram socketpair, answering in a thread, over an image of
    NBD_DISK_SECTORS; yields a namespace with ours (the initiator's end), image, original (the
    image's first bytes), target, flushes (ATA flush opcodes it was sent), and two switches:
    silent (frames go unanswered) and refuse_flush_ext (FLUSH CACHE EXT aborted, as vblade
    does)."""
    original = seeded_bytes(random.Random(12), NBD_DISK_SECTORS * 512)
    image = tmp_path / "disk"
    image.write_bytes(original)
    target = aoe.AoeTarget(3, 7, aoe.Export(str(image)), MAC_T, 9000, bufcnt)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    stop, silent, refuse_flush_ext = threading.Event(), threading.Event(), threading.Event()
    flushes = collections.Counter()

    def serve_frames():
        theirs.settimeout(0.05)
        while not stop.is_set():
            try:
                frame = theirs.recv(70000)
            except socket.timeout:
                continue
            if silent.is_set():
                continue
            if frame[27] in (aoe.ATA_CMD_FLUSH, aoe.ATA_CMD_FLUSH_EXT):
                flushes[frame[27]] += 1
            if frame[27] == aoe.ATA_CMD_FLUSH_EXT and refuse_flush_ext.is_set():
                answer = ScriptedTarget.answer(frame, status=aoe.ATA_DRDY | aoe.ATA_ERR,
                                               err=aoe.ATA_ABORTED)
            else:
                answer = target.handle(frame)
            if answer:
                theirs.send(answer)
    server = threading.Thread(target=serve_frames, daemon=True)
    server.start()
    try:
        yield types.SimpleNamespace(ours=ours, image=image, original=original, target=target,
                                    flushes=flushes, silent=silent,
                                    refuse_flush_ext=refuse_flush_ext)
    finally:
        stop.set()
        server.join(5)
        ours.close()
        theirs.close()


@contextlib.contextmanager
def nbd_bridge_lab(tmp_path, bufcnt=16):
    """The helper's nbd bridge on one end of a stream socketpair (the kernel's end is yielded),
    through a real engine to socketpair_target with `bufcnt` buffers; yields a namespace with
    kernel, engine, host, nbd, image, original, target and flushes (see socketpair_target)."""
    helper = aoe.load_helper()
    need(helper is not None, "needs the compiled helper: python3 build_ffi.py")
    with socketpair_target(tmp_path, bufcnt) as far:
        kernel, sock = socket.socketpair()
        with kernel, sock:
            engine = aoe.Engine(lab_target([PairPort(far.ours, MAC_I)], [MAC_T],
                                           sectors=NBD_DISK_SECTORS, bufcnt=bufcnt),
                                helper=helper)
            host = nbd_host(engine)
            nbd = aoe.NbdBackend(host, helper)
            nbd.sock = sock
            yield types.SimpleNamespace(kernel=kernel, engine=engine, host=host, nbd=nbd,
                                        image=far.image, original=far.original,
                                        target=far.target, flushes=far.flushes)


def serve_nbd_round(lab):
    """One round of the attach daemon's loop for an nbd device: pump, failures, intake."""
    for rid, status in lab.engine.poll(2000, lab.nbd.wait_fd()):
        lab.nbd.completed(rid, status)
    return lab.nbd.intake()


@pytest.mark.engine
def test_nbd_bridge_in_the_helper_serves_the_stream_through_the_engine(tmp_path):
    """The same stream served by the helper's nbd bridge, through a real engine to a target
    (serve's AoeTarget on a datagram socketpair): the same answers and the same disk; while
    the target is down the requests are handed to Python and fail with EIO; the kernel's
    disconnect ends it."""
    with nbd_bridge_lab(tmp_path) as lab:
        nbd, kernel = lab.nbd, lab.kernel
        nbd.serve_socket()
        assert isinstance(nbd.server, aoe.NbdBridged)

        def serve_round(all_sent):
            assert serve_nbd_round(lab)
        sent, expected = nbd_requests(random.Random(12))
        answers = play_nbd_kernel(random.Random(13), kernel, sent, expected, serve_round)
        lab.target.export.close()
        check_nbd_answers(answers, expected, lab.original, bytearray(lab.image.read_bytes()))
        good = [k for k, _, _, error in expected.values() if not error]
        assert sum(lab.flushes.values()) >= (good.count(aoe.NBD_CMD_FLUSH)
                                             + sum(1 for k in good if k & aoe.NBD_CMD_FLAG_FUA))
        assert nbd.server.open == 0
        # down: every request is handed over and fails here
        lab.host.up = False
        nbd.set_down(True)
        kernel.send(aoe.NBD_REQUEST.pack(aoe.NBD_REQUEST_MAGIC, aoe.NBD_CMD_READ, b"downdown",
                                         0, 4096))
        for _ in range(100):
            serve_round(True)
            if nbd.server.open == 0:
                break
        assert kernel.recv(100) == aoe.NBD_REPLY.pack(aoe.NBD_REPLY_MAGIC, errno.EIO, b"downdown")
        kernel.send(aoe.NBD_REQUEST.pack(aoe.NBD_REQUEST_MAGIC, aoe.NBD_CMD_DISC, b"bye", 0, 0))
        for _ in range(100):
            if not serve_nbd_round(lab):
                break
        assert nbd.ended
        nbd.close()


@pytest.mark.engine
@pytest.mark.parametrize("mix", ["reads", "mixed"])
def test_nbd_bridge_answers_a_full_window_piled_up(tmp_path, mix):
    """A 64-buffer target and the kernel not reading: the bridge's 64 requests (4 KiB reads, or
    reads, writes and flushes mixed) are all answered by the target while the kernel's socket is
    full, so the answers pile up in the bridge's queue; once the kernel reads, each arrives once,
    well framed, with the right data.  An answer takes one iovec (no data, or only what is left
    of a partly sent one) or two (a read's header and data): with the first answer partly sent
    and reads behind it, a batch of answers once ran one iovec past the send's array (the
    sanitized build of the CI run reports that)."""
    with nbd_bridge_lab(tmp_path, bufcnt=64) as lab:
        nbd, kernel = lab.nbd, lab.kernel
        nbd.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)   # full after one answer
        nbd.serve_socket()
        sent, expected = bytearray(), {}
        rng = random.Random(14)
        for i in range(aoe.NBD_MAX_READ):
            handle, lba = struct.pack(">Q", i), 8 * i
            kind = aoe.NBD_CMD_READ
            if mix == "mixed" and i % 3 == 0:
                kind = (aoe.NBD_CMD_WRITE, aoe.NBD_CMD_FLUSH)[i % 6 // 3]
            length = 0 if kind == aoe.NBD_CMD_FLUSH else 4096
            sent += aoe.NBD_REQUEST.pack(aoe.NBD_REQUEST_MAGIC, kind, handle, lba * 512, length)
            what = length
            if kind == aoe.NBD_CMD_WRITE:
                what = seeded_bytes(rng, length)
                sent += what
            expected[handle] = (kind, lba, what, 0)
        kernel.sendall(sent)
        deadline, answered, quiet = time.monotonic() + 30, -1, 0
        while quiet < 3:                                 # the engine idle, nothing more answered
            assert time.monotonic() < deadline, "requests still in the engine"
            assert serve_nbd_round(lab)
            pump = lab.engine.pump
            quiet = quiet + 1 if not pump.active_requests and pump.answered == answered else 0
            answered = pump.answered
        # all answered by the target; the kernel's socket took one or two of them
        assert nbd.server.open >= len(expected) - 2
        answers = bytearray()
        total = sum(aoe.NBD_REPLY.size + (what if kind == aoe.NBD_CMD_READ else 0)
                    for kind, _, what, _ in expected.values())
        kernel.setblocking(False)
        while len(answers) < total:
            assert time.monotonic() < deadline, "answers missing: %d of %d bytes" % (
                len(answers), total)
            with contextlib.suppress(BlockingIOError):
                answers += kernel.recv(1 << 20)
            assert serve_nbd_round(lab)
        lab.target.export.close()
        check_nbd_answers(answers, expected, lab.original, bytearray(lab.image.read_bytes()))
        assert nbd.server.open == 0
        nbd.close()


class MemoryDevice:
    """The kernel's side of a MemoryBackend's block device: the test submits requests (engine
    ops) and waits for their answers; the backend is woken through a pipe to take them."""

    WAIT = 20                                     # seconds an answer may take

    def __init__(self):
        self.wake_out, self.wake_in = os.pipe()
        os.set_blocking(self.wake_out, False)
        self.lock = threading.Condition()
        self.queued, self.answers, self.next_rid = [], {}, 0
        self.events = []                          # what the daemon asked of the backend
        self.gone = False                         # let go of, as by another's STOP_DEV

    def let_go(self):
        self.gone = True
        os.write(self.wake_in, b"!")

    def take(self):
        """The requests submitted since the last take (the backend's side)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_out, 4096)
        with self.lock:
            taken, self.queued = self.queued, []
        return taken

    def answer(self, rid, status):
        with self.lock:
            self.answers[rid] = status
            self.lock.notify_all()

    def submit(self, op, lba=0, count=0, data=None):
        """A request into the device; returns its id and buffer."""
        buf = bytearray(data if data is not None else count * 512)
        with self.lock:
            self.next_rid += 1
            rid = self.next_rid
            self.queued.append((rid, op, lba, count, buf))
        os.write(self.wake_in, b"!")
        return rid, buf

    def io(self, op, lba=0, count=0, data=None):
        """Submit and wait: (status, buffer)."""
        rid, buf = self.submit(op, lba, count, data)
        with self.lock:
            assert self.lock.wait_for(lambda: rid in self.answers, self.WAIT), "no answer"
            return self.answers.pop(rid), buf

    def close(self):
        os.close(self.wake_out)
        os.close(self.wake_in)


class MemoryBackend(aoe.BlockBackend):
    """A block device that exists only in the test: requests come from the test's
    MemoryDevice and go through the engine as the kernel's go through ublk's."""

    name = "memory"
    device = None                                 # the test's MemoryDevice

    def __init__(self, host, helper):
        self.host, self.engine, self.device = host, host.engine, MemoryBackend.device
        self.dev_id = None
        self.inflight = {}                        # request id -> engine op

    @staticmethod
    def missing(helper):
        return None

    @staticmethod
    def frames_needed(target):
        return 256

    @staticmethod
    def remove_orphan(attachment):
        MemoryBackend.device.events.append(("orphan removed", attachment.dev))
        return None

    @property
    def dev(self):
        return "mem%d" % self.dev_id

    @property
    def features(self):
        return []

    def create(self):
        self.dev_id = self.host.target.slot
        self.host.record(self, aoe.STATE_UP, True)

    def recover(self, attachment):
        self.dev_id = attachment.dev_id
        self.host.record(self, aoe.STATE_RECOVERING, True)

    def resize(self, sectors):
        self.engine.sectors = sectors
        self.device.events.append(("resized", sectors))

    def hand_over(self):
        self.host.serve_while(lambda: self.device.events.append("paused"))

    def wait_fd(self):
        return self.device.wake_out

    def intake(self):
        for rid, op, lba, count, buf in self.device.take():
            if not self.host.up or op == aoe.OP_WRITE and self.host.readonly:
                self.device.answer(rid, -errno.EIO)
                continue
            self._send(rid, op, lba, count, buf)
        return not self.device.gone

    def _send(self, rid, op, lba, count, buf):
        try:
            self.engine.submit(op, lba, count, buf, req_id=rid)
        except aoe.AoeError:
            self.device.answer(rid, -errno.EIO)
            return
        self.inflight[rid] = op

    def completed(self, rid, status):
        op = self.inflight.pop(rid)
        if status and op == aoe.OP_FLUSH and self.engine.fall_back_flush(status):
            return self._send(rid, op, 0, 0, None)
        self.device.answer(rid, status)

    def set_down(self, down):
        self.device.events.append(("down", down))

    def report(self):
        return "%d requests in flight" % len(self.inflight)

    def stop(self):
        """The kernel writes back through the device (a flush) before it stops."""
        rid, _ = self.device.submit(aoe.OP_FLUSH)
        limit = time.monotonic() + MemoryDevice.WAIT
        while rid not in self.device.answers and time.monotonic() < limit:
            self.host.serve(10000)
        self.device.events.append(("stopped", self.device.answers.pop(rid, None)))

    def close(self):
        self.device.events.append("closed")


def wait_until(condition, what, seconds=15):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.engine
@pytest.mark.parametrize("kind", ["python", "helper"])
def test_attach_daemon_life_on_a_memory_backend(kind, monkeypatch, tmp_path):
    """The attach daemon's whole life without root or a kernel driver: a memory backend over a
    target on a socketpair.  Made and recorded, I/O through the engine, the flush fallback
    (FLUSH CACHE EXT aborted: FLUSH CACHE), the target silent: I/O fails after deadsecs and the
    device is down, failing at once, until a probe is answered; a resize and a hand-over asked
    as commands ask; a new daemon takes the device over; the kernel lets go of it; made again,
    SIGTERM detaches it."""
    helper = aoe.load_helper() if kind == "helper" else None
    need(kind == "python" or helper is not None, "needs the compiled helper: python3 build_ffi.py")
    monkeypatch.setattr(aoe, "RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(aoe, "LINK_DIR", str(tmp_path / "etherd"))
    monkeypatch.setattr(aoe.Attachment, "daemon_alive", property(lambda a: a.pid == os.getpid()))
    monkeypatch.setitem(aoe.BACKEND_CLASSES, MemoryBackend.name, MemoryBackend)
    device = MemoryBackend.device = MemoryDevice()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                                    signal.SIGUSR1)}
    read, write, flush = aoe.OP_READ, aoe.OP_WRITE, aoe.OP_FLUSH
    try:
        with socketpair_target(tmp_path) as far:
            def target(sectors=NBD_DISK_SECTORS):
                return lab_target([PairPort(far.ours, MAC_I)], [MAC_T], sectors=sectors)
            options = aoe.AttachOptions(deadsecs=2, scheduler="kernel")
            host = aoe.DeviceHost(helper, options, log_files=True)
            a = host.attach(target(), MemoryBackend.name)
            assert (a.device, a.dev, a.state, a.sectors) == \
                ("e3.7", "mem7", aoe.STATE_UP, NBD_DISK_SECTORS)
            assert aoe.Attachment.load("e3.7").pid == os.getpid()
            assert os.readlink(str(tmp_path / "etherd" / "e3.7")) == "/dev/mem7"
            data = seeded_bytes(random.Random(5), 16 * 512)
            assert device.io(write, 100, 16, data)[0] == 0
            assert device.io(read, 100, 16) == (0, bytearray(data))
            assert far.image.read_bytes()[100 * 512:116 * 512] == data
            far.refuse_flush_ext.set()
            assert device.io(flush)[0] == 0
            refused = far.flushes[aoe.ATA_CMD_FLUSH_EXT]   # more than once if resent
            assert refused and far.flushes[aoe.ATA_CMD_FLUSH]
            assert device.io(flush)[0] == 0
            assert far.flushes[aoe.ATA_CMD_FLUSH_EXT] == refused      # FLUSH CACHE from now on

            far.silent.set()
            start = time.monotonic()
            assert device.io(read, 0, 8)[0] != 0
            assert time.monotonic() - start >= options.deadsecs
            wait_until(lambda: aoe.Attachment.load("e3.7").state == aoe.STATE_DOWN, "never down")
            start = time.monotonic()
            assert device.io(read, 0, 8)[0] == -errno.EIO
            assert time.monotonic() - start < options.deadsecs
            far.silent.clear()
            wait_until(lambda: aoe.Attachment.load("e3.7").state == aoe.STATE_UP,
                       "a probe answered did not bring it back")
            assert device.events == [("down", True), ("down", False)]
            assert device.io(read, 100, 16) == (0, bytearray(data))

            said = aoe.ask_daemon(a, aoe.VERB_RESIZE, sectors=NBD_DISK_SECTORS // 2)
            assert said.endswith("resized from %d to %d sectors"
                                 % (NBD_DISK_SECTORS, NBD_DISK_SECTORS // 2))
            assert aoe.Attachment.load("e3.7").sectors == NBD_DISK_SECTORS // 2
            assert device.io(read, NBD_DISK_SECTORS // 2, 1)[0] == -errno.EIO
            with pytest.raises(aoe.AoeError, match="refusing a size of 0"):
                aoe.ask_daemon(a, aoe.VERB_RESIZE, sectors=0)

            assert "handed over" in aoe.ask_daemon(a, aoe.VERB_HAND_OVER)
            wait_until(lambda: not host.daemons, "the daemon did not end after its hand-over")
            left = aoe.Attachment.load("e3.7")
            assert (left.state, left.pid) == (aoe.STATE_HANDED_OVER, None)
            assert device.events[-2:] == ["paused", "closed"]
            b = host.attach(target(NBD_DISK_SECTORS // 2), left.backend, aoe.START_RECOVER)
            assert (b.dev, b.state, b.sectors) == ("mem7", aoe.STATE_UP, NBD_DISK_SECTORS // 2)
            assert device.io(read, 100, 16) == (0, bytearray(data))

            device.let_go()
            assert host.wait() == aoe.EXIT_FAIL
            assert ("orphan removed", "mem7") in device.events
            assert aoe.Attachment.load("e3.7") is None
            assert not os.path.lexists(str(tmp_path / "etherd" / "e3.7"))
            assert "the kernel let go of /dev/mem7" in (tmp_path / "run" / "e3.7.log").read_text()

            device.gone = False
            host = aoe.DeviceHost(helper, options, log_files=True)
            host.attach(target(NBD_DISK_SECTORS // 2), MemoryBackend.name)
            os.kill(os.getpid(), signal.SIGTERM)
            assert host.wait() == aoe.EXIT_OK
            assert device.events[-2:] == [("stopped", 0), "closed"]
            assert aoe.Attachment.load("e3.7") is None
            assert not os.path.lexists(str(tmp_path / "etherd" / "e3.7"))
            log = (tmp_path / "run" / "e3.7.log").read_text()
            assert "I/O fails until it answers again" in log and "detached /dev/mem7" in log
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        device.close()


@pytest.mark.engine
def test_device_host_goes_on_when_one_device_fails(monkeypatch, tmp_path):
    """The attach process's devices are threads: one whose serving fails ends alone (its
    traceback in its own log), one that cannot be made fails its attach with its error,
    signals reach every device (also while the host holds its lock), and a stop ends them
    all."""
    monkeypatch.setattr(aoe, "RUN_DIR", str(tmp_path))
    monkeypatch.setattr(aoe, "LINK_DIR", str(tmp_path / "etherd"))
    fail_now = threading.Event()

    class FlawedBackend(MemoryBackend):
        def create(self):
            if self.host.target.name == "e1.3":
                raise aoe.AoeError("e1.3: no such thing")
            super().create()

        def intake(self):
            if self.host.target.name == "e1.2" and fail_now.is_set():
                raise RuntimeError("a bug in e1.2's request path")
            return super().intake()

    monkeypatch.setitem(aoe.BACKEND_CLASSES, "flawed", FlawedBackend)
    device = MemoryBackend.device = MemoryDevice()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    def target(slot):
        return lab_target([PairPort(ours, MAC_I)], [MAC_T], shelf=1, slot=slot)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                                    signal.SIGUSR1, signal.SIGALRM)}
    try:
        host = aoe.DeviceHost(None, aoe.AttachOptions(deadsecs=1, scheduler="kernel"),
                              log_files=True)
        assert host.attach(target(1), "flawed").block == "/dev/mem1"
        assert host.attach(target(2), "flawed").block == "/dev/mem2"
        with pytest.raises(aoe.AoeError, match="e1.3: no such thing"):
            host.attach(target(3), "flawed")
        one, two = host.daemons
        fail_now.set()
        wait_until(lambda: two not in host.daemons, "e1.2 goes on after its failure", 5)
        assert host.daemons == [one] and len(host.threads) == 1
        log = (tmp_path / "e1.2.log").read_text()
        assert "a bug in e1.2's request path" in log and "/dev/mem2 is left for" in log
        assert "no such thing" in (tmp_path / "e1.3.log").read_text()
        def deadlocked(signum, frame):
            raise TimeoutError("a signal's handler waited for the lock its thread holds")
        signal.signal(signal.SIGALRM, deadlocked)
        signal.alarm(5)
        with host.lock:                           # a signal comes while the host holds it
            os.kill(os.getpid(), signal.SIGUSR1)
            wait_until(lambda: one.report_wanted or "state up" in
                       (tmp_path / "e1.1.log").read_text(), "SIGUSR1 did not reach e1.1", 5)
        signal.alarm(0)
        assert not one.stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert host.wait() == aoe.EXIT_FAIL and one.stop and host.daemons == []
        assert "detached /dev/mem1" in (tmp_path / "e1.1.log").read_text()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        device.close()
        ours.close()
        theirs.close()


def copy_of_checkout(dest):
    """What the root-free groups need of the checkout, copied into dest, where a helper can be
    built without touching the checkout's own; returns dest."""
    for name in ("aoe.py", "_aoeio.c", "build_ffi.py", "test_aoe.py", "pytest.ini"):
        shutil.copy(os.path.join(HERE, name), str(dest))
    return str(dest)


def build_helper(python, checkout, *options):
    """build_ffi.py run by `python` in `checkout`: a helper for that Python's ABI."""
    build = subprocess.run([python, "build_ffi.py"] + list(options), cwd=checkout,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr[-3000:]


def run_root_free_groups(python, checkout, *options, env=None):
    """The codec and engine groups run by `python` in `checkout`, all but the test that runs
    them under the oldest Python."""
    return subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + list(options)
                          + ["-m", "codec or engine", "-k",
                             "not test_root_free_groups_pass_under_the_oldest_python",
                             "test_aoe.py"],
                          cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=1800, env=env)


@pytest.mark.sanitize
def test_root_free_groups_pass_with_the_helper_under_asan_and_ubsan(tmp_path):
    """The codec and engine groups run once more in a copy of the checkout whose helper is
    built by `build_ffi.py --sanitize`: any read or write out of bounds, use after free or
    undefined behaviour in the C they drive ends the run with a report, and fails this."""
    libasan = subprocess.run(["cc", "-print-file-name=libasan.so"], capture_output=True,
                             text=True).stdout.strip()
    need(os.path.isabs(libasan), "needs gcc's AddressSanitizer runtime (libasan)")
    checkout = copy_of_checkout(tmp_path)
    build_helper(sys.executable, checkout, "--sanitize")
    # --capture=sys: a report is written to file descriptor 2 just before the process ends
    r = run_root_free_groups(sys.executable, checkout, "--capture=sys",
                             env=dict(os.environ, LD_PRELOAD=libasan,
                                      ASAN_OPTIONS="detect_leaks=0",
                                      UBSAN_OPTIONS="print_stacktrace=1"))
    report = re.search(r"^.*(runtime error|ERROR: AddressSanitizer).*$", r.stderr + r.stdout,
                       re.M)
    assert r.returncode == 0 and not report, (report and report.group(0), r.stdout[-3000:],
                                              r.stderr[-3000:])
    assert re.search(r"^\d+ passed", r.stdout.splitlines()[-1]), r.stdout[-2000:]


# The oldest Python aoe.py runs on (a rescue system's: RHEL 8's platform Python, Ubuntu 18.04)
OLDEST_PYTHON = "3.6"


def python_version_binary(version):
    """The real interpreter of Python `version` ("3.6") here (python3.6 on PATH, or one pyenv
    has), not a wrapper that finds it."""
    binary = "python" + version
    candidates = [shutil.which(binary)]
    if shutil.which("pyenv"):
        root = subprocess.run(["pyenv", "root"], stdout=subprocess.PIPE,
                              universal_newlines=True).stdout.strip()
        candidates += sorted(glob.glob(os.path.join(root, "versions", version + ".*", "bin",
                                                    binary)))
    wanted = str(tuple(int(part) for part in version.split(".")))
    for candidate in filter(None, candidates):
        r = subprocess.run([candidate, "-c",
                            "import sys; print(sys.executable, sys.version_info[:2])"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        if r.returncode == 0 and r.stdout.split(" ", 1)[1].strip() == wanted:
            return r.stdout.split(" ", 1)[0]
    need(False, "needs a Python %s (%s on PATH, or in pyenv; .ci/run installs what the tests "
                "need into it)" % (version, binary))


@pytest.fixture(scope="module")
def oldest_python(tmp_path_factory):
    """(interpreter, directory): the oldest Python aoe.py runs on, and a copy of the checkout
    with the helper built for it (a .so of its own, named with its ABI tag)."""
    python = python_version_binary(OLDEST_PYTHON)
    need(subprocess.run([python, "-c", "import cffi, pytest"],
                        stderr=subprocess.DEVNULL).returncode == 0,
         "needs pytest and cffi in Python %s: %s -m pip install 'pytest<7.1' cffi"
         % (OLDEST_PYTHON, python))
    checkout = copy_of_checkout(tmp_path_factory.mktemp("python" + OLDEST_PYTHON))
    build_helper(python, checkout)
    return python, checkout


@pytest.mark.codec
def test_root_free_groups_pass_under_the_oldest_python(oldest_python):
    """The codec and engine groups (but this test) pass under Python 3.6 with its own helper:
    build_ffi.py, aoe.py on every path they take, and these tests use nothing that newer
    Pythons added (a function, a keyword argument, a default, a module constant).  The fuzz
    test sends a tenth of its default frames: the same paths, in less time."""
    python, checkout = oldest_python
    r = run_root_free_groups(python, checkout, env=dict(os.environ, AOE_FUZZ_FRAMES="100000"))
    summary = r.stdout.splitlines()[-1] if r.stdout.strip() else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary.split(" in ")[0])}
    assert r.returncode == 0 and counts.get("passed") and \
        set(counts) <= {"passed", "skipped", "deselected", "warnings"}, \
        (r.stdout[-3000:], r.stderr[-2000:])
    print("Python %s: %s" % (OLDEST_PYTHON, summary))


# -----------------------------------------------------------------------------
# rescue: GNU ddrescue's mapfile and the phases, against a simulated failing disk
# -----------------------------------------------------------------------------

MANUAL_MAP = """# Mapfile. Created by GNU ddrescue version 1.25
# Command line: ddrescue -d -c18 /dev/fd0 fdimage mapfile
# Start time:   2015-07-21 09:37:44
# Current time: 2015-07-21 09:38:19
# Copying non-tried blocks... Pass 1 (forwards)
# current_pos  current_status  current_pass
0x00120000     ?               1
#      pos        size  status
0x00000000  0x00117000  +
0x00117000  0x00000200  -
0x00117200  0x00001000  /
0x00118200  0x00007E00  *
0x00120000  0x00048000  ?
"""


@pytest.mark.codec
def test_mapfile_reads_the_manuals_example_and_writes_it_back_exactly():
    rmap = aoe.RescueMap.parse(MANUAL_MAP, "mapfile", 0x168000)
    assert rmap.blocks == [[0, 0x117000, "+"], [0x117000, 0x200, "-"], [0x117200, 0x1000, "/"],
                           [0x118200, 0x7E00, "*"], [0x120000, 0x48000, "?"]]
    assert (rmap.pos, rmap.phase, rmap.passno) == (0x120000, "?", 1)
    heading = MANUAL_MAP.split("# current_pos")[0].replace("# ", "").splitlines()
    assert rmap.text(heading) == MANUAL_MAP
    # the device is larger than the map: the rest is non-tried
    assert aoe.RescueMap.parse(MANUAL_MAP, "m", 0x200000).blocks[-1] == [0x120000, 0xE0000, "?"]


@pytest.mark.codec
def test_mapfile_reads_what_people_and_older_versions_write():
    """Decimal and octal-looking numbers (a leading 0 is octal, as for ddrescue), comments
    anywhere, a two-field status line (ddrescue before 1.22), a first block not at 0,
    neighbours of one status merged."""
    text = ("  # a comment\n\n4096 *   # two fields\n"
            "01000 0x200 +\n"            # 01000 octal = 512
            "1024 512 + # same status: merged\n"
            "1536 010000 -\n")           # 010000 octal = 4096
    rmap = aoe.RescueMap.parse(text, "m", 8192)
    assert (rmap.pos, rmap.phase, rmap.passno) == (4096, "*", 1)
    assert rmap.blocks == [[0, 512, "?"], [512, 1024, "+"], [1536, 4096, "-"],
                           [5632, 2560, "?"]]


@pytest.mark.codec
@pytest.mark.parametrize("text, said", [
    ("", "no status line"),
    ("0 ?\n0 512 x\n", "line 2: not 'pos size status'"),
    ("0 ? 0\n", "line 1: position below 0 or pass below 1"),
    ("0 Q\n", "line 1: not 'pos status [pass]'"),
    ("0 ?\n0 512 +\n1024 512 +\n", "line 3: block at 0x400 does not start where"),
    ("0 ?\n0 0 +\n", "line 2: a block needs pos >= 0 and size > 0"),
    ("0 ?\n0 100 +\n", "line 2: block 0x0+0x64 is not in whole 512-byte sectors"),
    ("0 ?\n0 9000 +\n", "is not in whole"),
    ("0 ?\n0 0x4000 +\n", "goes past the end of the device"),
    ("0 ?\n0 12x +\n", "line 2:"),
    ("0 ?\n0 09 +\n", "line 2:"),                  # not octal
])
def test_corrupt_mapfiles_get_one_clear_error(text, said):
    with pytest.raises(aoe.AoeError) as e:
        aoe.RescueMap.parse(text, "disk.map", 8192)
    assert said in str(e.value) and "\n" not in str(e.value) and e.value.code == aoe.EXIT_USAGE


@pytest.mark.codec
def test_map_set_keeps_blocks_contiguous_and_merged():
    rng = random.Random(5)
    size = 512 * 300
    rmap, model = aoe.RescueMap(size), ["?"] * 300
    for _ in range(2000):
        a = rng.randrange(300)
        b = rng.randrange(a + 1, min(300, a + 40) + 1)
        status = rng.choice(aoe.MAP_STATUSES)
        rmap.set(a * 512, (b - a) * 512, status)
        model[a:b] = [status] * (b - a)
        at = 0
        for pos, length, st in rmap.blocks:
            assert pos == at and length > 0 and model[pos // 512:(pos + length) // 512] == \
                [st] * (length // 512)
            at = pos + length
        assert at == size
        assert all(x[2] != y[2] for x, y in zip(rmap.blocks, rmap.blocks[1:]))


class SimulatedDisk:
    """An engine over a failing disk in memory: a frame (spf sectors) holding a bad sector
    fails with ABRT and the request goes on with its other frames; a read touching a slow
    sector answers `slow` polls later; after `silent_after` polls nothing answers and the
    engine is dead, as Engine is after deadsecs."""

    def __init__(self, data, bad, spf=2, slow=(), slow_polls=5, silent_after=None,
                 interrupt_at=None):
        self.data, self.bad, self.spf, self.slow = data, set(bad), spf, set(slow)
        self.slow_polls, self.silent_after, self.interrupt_at = slow_polls, silent_after, \
            interrupt_at
        self.window, self.policy, self.dead = 16, [None], None
        self.sectors = len(data) // 512
        self.pending, self.failures, self.polls, self.next_id = [], {}, 0, 0
        self.reads = collections.Counter()
        self.patience = []                          # every be_patient() asked, in order

    def submit(self, op, lba, count, buf):
        assert op == aoe.OP_READ and 0 <= lba and lba + count <= self.sectors and count > 0
        if self.dead:
            raise aoe.AoeError(self.dead)
        self.next_id += 1
        delay = self.slow_polls if self.slow & set(range(lba, lba + count)) else 1
        self.pending.append((self.polls + delay, self.next_id, lba, count, buf))
        return self.next_id

    def poll(self, timeout_us):
        self.polls += 1
        if self.interrupt_at is not None and self.polls >= self.interrupt_at:
            raise KeyboardInterrupt
        if self.silent_after is not None and self.polls > self.silent_after:
            self.dead = "e3.7: no answer for 5 s (deadsecs)"
            done = [(rid, -errno.ETIMEDOUT) for _, rid, _, _, _ in self.pending]
            self.pending = []
            return done
        done, keep = [], []
        for item in self.pending:
            due, rid, lba, count, buf = item
            if due > self.polls:
                keep.append(item)
                continue
            failed = []
            for f in range(lba, lba + count, self.spf):
                n = min(self.spf, lba + count - f)
                self.reads.update(range(f, f + n))
                if self.bad & set(range(f, f + n)):
                    failed.append((f, n, -(aoe.STATUS_ATA_ERROR | aoe.ATA_ABORTED)))
                else:
                    buf[(f - lba) * 512:(f - lba + n) * 512] = self.data[f * 512:(f + n) * 512]
            if failed:
                self.failures[rid] = failed
            done.append((rid, failed[0][2] if failed else 0))
        self.pending = keep
        return done

    def failed_frames(self, rid):
        return self.failures.pop(rid, [])

    def be_patient(self, silent_us, reordered_us=0):
        self.patience.append((silent_us, reordered_us))

    def close(self):
        pass


def rescue_in_memory(disk, image, rmap, start=0, end=None, **options):
    """One Rescuer run into the file `image`; returns (rmap, interrupted)."""
    end = disk.sectors if end is None else end
    fd = os.open(str(image), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        aoe.Rescuer(disk, fd, rmap, start, end, lambda: None, **options).run()
        return rmap, False
    except KeyboardInterrupt:
        return rmap, True
    finally:
        os.close(fd)


def check_rescue(rmap, image, data, bad, start, end):
    """Every readable sector of the domain rescued with its bytes, every unreadable one bad,
    the map contiguous over the device; nothing outside the domain read or claimed."""
    at = 0
    for pos, length, status in rmap.blocks:
        assert pos == at and length > 0
        at += length
    assert at == len(data)
    got = image.read_bytes().ljust(len(data), b"\0")
    for lba in range(len(data) // 512):
        status = [st for pos, length, st in rmap.blocks if pos <= lba * 512 < pos + length][0]
        if not start <= lba < end:
            assert status == "?", lba
        elif lba in bad:
            assert status == "-", lba
        else:
            assert status == "+" and got[lba * 512:(lba + 1) * 512] == data[lba * 512:(lba + 1) * 512], \
                (lba, status)


def failing_disk(rng, sectors=4096):
    data = seeded_bytes(rng, sectors * 512)
    bad = set(rng.sample(range(sectors), 40))                          # scattered
    for area in (rng.randrange(sectors - 200) for _ in range(3)):      # bad areas
        bad.update(range(area, area + rng.choice((17, 64, 128))))
    bad.update((0, sectors - 1))                                       # the first and last
    return data, bad


@pytest.mark.codec
@pytest.mark.parametrize("spf, reverse, domain", [(2, False, None), (17, False, None),
                                                  (17, True, None), (2, False, (1000, 3000))])
def test_rescue_finds_every_bad_sector_and_keeps_every_good_one(tmp_path, spf, reverse, domain):
    rng = random.Random(spf * 7 + reverse)
    data, bad = failing_disk(rng)
    slow = set(rng.sample(sorted(bad), 5))
    disk = SimulatedDisk(data, bad, spf, slow=slow)
    start, end = domain or (0, disk.sectors)
    rmap, interrupted = rescue_in_memory(disk, tmp_path / "img", aoe.RescueMap(len(data)), start,
                                         end, reverse=reverse)
    assert not interrupted and rmap.phase == "+"
    check_rescue(rmap, tmp_path / "img", data, bad, start, end)
    # a good sector read once, twice if its frame held a bad one (copying, then trimming or
    # scraping); a bad one at most three times (copying, trimming, scraping)
    frame_mates = {lba + i for lba in bad for i in range(1 - spf, spf)}
    assert max(disk.reads[lba] for lba in range(start, end) if lba not in frame_mates) == 1
    assert max(disk.reads[lba] for lba in range(start, end) if lba not in bad) <= 2
    assert max(disk.reads[lba] for lba in bad if start <= lba < end) <= 3
    assert all(disk.reads[lba] == 0 for lba in range(disk.sectors) if not start <= lba < end)
    # copying sends a read again soon if newer ones are answered; a lone sector's only after
    # its own timeout
    copy, sector = aoe.RESCUE_COPY_TIMEOUT * 1000000, aoe.RESCUE_SECTOR_TIMEOUT * 1000000
    assert disk.patience[0] == (copy, 0) and disk.patience[-1] == (sector, sector)
    assert set(disk.patience) == {(copy, 0), (sector, sector)} and \
        disk.patience == sorted(disk.patience)              # copying's passes first


@pytest.mark.codec
def test_rescue_no_scrape_leaves_the_middles_and_retries_read_bad_sectors_again(tmp_path):
    data, bad = failing_disk(random.Random(3))
    disk = SimulatedDisk(data, bad, 17)
    rmap, _ = rescue_in_memory(disk, tmp_path / "img", aoe.RescueMap(len(data)), scrape=False)
    totals, _ = rmap.totals()
    assert totals["/"] > 0 and totals["*"] == 0 and totals["?"] == 0
    rmap, _ = rescue_in_memory(disk, tmp_path / "img", rmap, retries=2)   # scrapes, retries
    check_rescue(rmap, tmp_path / "img", data, bad, 0, disk.sectors)
    assert min(disk.reads[lba] for lba in bad) >= 3                     # retried twice


@pytest.mark.codec
def test_rescue_interrupted_anywhere_resumes_to_the_same_image_and_map(tmp_path):
    """Interrupted at random points, each time resumed from the mapfile as written (text, parsed
    back), the image and map end as one uninterrupted run's; and at every interruption the map
    claims no byte the image does not hold."""
    rng = random.Random(9)
    data, bad = failing_disk(rng)
    whole = tmp_path / "whole"
    reference, _ = rescue_in_memory(SimulatedDisk(data, bad, 17), whole, aoe.RescueMap(len(data)))
    image, rmap, runs = tmp_path / "img", aoe.RescueMap(len(data)), 0
    while True:
        runs += 1
        assert runs < 100
        disk = SimulatedDisk(data, bad, 17, interrupt_at=rng.randrange(1, 12))
        rmap, interrupted = rescue_in_memory(disk, image, rmap)
        got = image.read_bytes().ljust(len(data), b"\0") if image.exists() else bytes(len(data))
        for pos, length, status in rmap.blocks:
            if status == "+":
                assert got[pos:pos + length] == data[pos:pos + length]
        rmap = aoe.RescueMap.parse(rmap.text(["resumed"]), "m", len(data))
        if not interrupted:
            break
    assert runs > 3
    assert rmap.blocks == reference.blocks and image.read_bytes() == whole.read_bytes()


@pytest.mark.codec
def test_rescue_stops_when_the_target_goes_silent_and_keeps_what_it_has(tmp_path):
    data, bad = failing_disk(random.Random(4))
    disk = SimulatedDisk(data, bad, 17, silent_after=6)
    with pytest.raises(aoe.AoeError, match="deadsecs"):
        rescue_in_memory(disk, tmp_path / "img", aoe.RescueMap(len(data)))
    # what it rescued before is in the image (the map was kept by the caller)


@pytest.mark.codec
def test_ddrescuelog_reads_our_mapfile(tmp_path):
    """GNU ddrescue's own tool reads a map rescue wrote and finds the same totals."""
    need(shutil.which("ddrescuelog"), "needs ddrescuelog (Debian's gddrescue)")
    data, bad = failing_disk(random.Random(6))
    rmap, _ = rescue_in_memory(SimulatedDisk(data, bad, 17), tmp_path / "img",
                               aoe.RescueMap(len(data)))
    path = tmp_path / "map"
    path.write_text(rmap.text(["Mapfile. Created by aoe.py", "Finished"]))
    listed = subprocess.run(["ddrescuelog", "-l-", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    assert listed.returncode == 0, listed.stderr
    assert set(map(int, listed.stdout.split())) == bad
    done = subprocess.run(["ddrescuelog", "-D", str(path)])
    assert done.returncode == 1                       # not finished: bad sectors remain


# -----------------------------------------------------------------------------
# cli: the manual page, made from the argument parser; needs groff
# -----------------------------------------------------------------------------

def aoe_commands():
    """name -> subparser of every aoe.py command."""
    parser = aoe.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def run_text(argv, stdin=None):
    """argv run with stdin's text; the finished process, its output as text.  Without
    LD_PRELOAD: the sanitize test preloads ASan for the helper, and groff is not ours to
    check."""
    env = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    return subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60, env=env)


@pytest.mark.codec
def test_man_page_renders_cleanly_and_names_every_command_option_and_example():
    """`aoe.py man` renders without a warning from groff (-ww), and its text names every
    command, every option of each with its help (so an option without help fails here), every
    example, each aoetools name with the command it runs, every exit status and every
    environment variable aoe.py reads."""
    need(shutil.which("groff"), "needs groff (apt-get install groff-base)")
    made = run_text([sys.executable, AOE_PY, "man"])
    assert (made.returncode, made.stderr) == (0, ""), made.stderr
    checked = run_text(["groff", "-man", "-Tutf8", "-ww", "-z"], made.stdout)
    assert (checked.returncode, checked.stderr) == (0, ""), checked.stderr
    # plain ASCII: no bold or underline, options' minus signs as '-'
    text = run_text(["groff", "-man", "-Tascii", "-P-cbou"], made.stdout).stdout
    flat = " ".join(text.split())
    for name, command in aoe_commands().items():
        assert "aoe.py %s " % name in flat, name
        for action in command._actions:
            for option in action.option_strings:
                assert re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(option), text), \
                    (name, option)
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help, "aoe.py %s %s has no help" % (name, action.option_strings[0])
                said = aoe.sentence(command._get_formatter()._expand_help(action))
                assert " ".join(said.split()) in flat, (name, action.option_strings, said)
        for line in aoe.EXAMPLES[name].splitlines():
            assert line in text, (name, line)
    for tool in aoe.AOETOOLS:
        assert aoe.tool_verb(tool) in aoe_commands(), tool
        assert re.search(r"^ +%s\b" % re.escape(tool), text, re.M), tool
        assert "See %s above." % aoe.tool_verb(tool) in flat, tool
    exits = {value for name, value in vars(aoe).items()
             if name.startswith("EXIT_") and isinstance(value, int)}
    assert exits == set(aoe.EXIT_MEANINGS)
    for code in exits:
        assert re.search(r"^ +%d +\S" % code, text, re.M), code
    with open(AOE_PY) as f:
        read = set(re.findall(r"environ(?:\.get\(|\[)\s*\"(\w+)\"", f.read()))
    assert read == {name for name, _ in aoe.ENVIRONMENT}
    for name in read:
        assert re.search(r"^ +%s$" % name, text, re.M), name


@pytest.mark.codec
def test_man_page_needs_the_docstrings_that_python_oo_drops():
    """Under python -OO (no docstrings) `aoe.py man` says why it cannot, in one line."""
    r = run_text([sys.executable, "-OO", AOE_PY, "man"])
    assert r.returncode == aoe.EXIT_FAIL and r.stdout == "", r.stdout[:200]
    assert len(r.stderr.splitlines()) == 1 and "-OO" in r.stderr, r.stderr


# -----------------------------------------------------------------------------
# net: namespaces, veth, vblade and aoetools
# -----------------------------------------------------------------------------

class Bench(aoe.NetLab):
    """aoe.NetLab plus what the tests need: skips when the machine cannot host
    it, vblade, and running aoe.py or other tools on either side."""

    def __init__(self, mtu, tmp_path):
        need(os.geteuid() == 0, "needs root to create network namespaces")
        need(shutil.which("ip"), "needs iproute2 (ip)")
        super().__init__(mtu, prefix="aoetest")
        self.tmp = tmp_path

    def start(self, ns, argv, ready=None):
        """Killed by close(), and after 15 minutes in any case."""
        log = open(os.path.join(str(self.tmp), "proc%d.log" % len(self.procs)), "w+")
        return super().start(ns, ["timeout", "900"] + list(argv), ready=ready, log=log)

    def vblade(self, shelf, slot, path, *opts):
        need(shutil.which("vblade"), "needs vblade (apt-get install vblade)")
        return self.start(self.tgt_ns,
                          ["vblade"] + list(opts) + [str(shelf), str(slot), self.tgt_if, path],
                          ready="pid ")

    def run(self, ns, argv, timeout=120):
        return subprocess.run(self.argv(ns, argv), capture_output=True, text=True, timeout=timeout)

    def mac(self, side):
        return super().mac(*((self.ini_ns, self.ini_if) if side == "ini"
                             else (self.tgt_ns, self.tgt_if)))

    def aoe(self, *args, timeout=300, env=None, binary=False, python=None):
        """aoe.py in the initiator namespace, limited to the test's interfaces; `python`, an
        (interpreter, aoe.py) pair, runs another than this interpreter and checkout's."""
        full_env = self.env()
        full_env.update(env or {})
        argv = (self.aoe_argv(self.ini_ns, args) if python is None
                else self.argv(self.ini_ns, list(python) + list(args)))
        return subprocess.run(argv, capture_output=True, timeout=timeout, env=full_env,
                              **({} if binary else {"errors": "replace"}))

    def aoe_json(self, *args, python=None):
        r = self.aoe(*args, "--json", python=python)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


@pytest.fixture(params=["helper", "python"])
def data_path(request):
    """Environment for aoe.py that selects the compiled helper or the pure-Python data path."""
    if request.param == "helper":
        need(aoe.load_helper() is not None, "needs the compiled helper: python3 build_ffi.py")
        return {}
    return {"AOE_NO_HELPER": "1"}


def make_file(path, size, random_bytes=0):
    with open(path, "wb") as f:
        f.truncate(size)
        if random_bytes:
            f.write(os.urandom(random_bytes))
    return str(path)


# >= 28 bytes so vblade's answer is not a runt
CONFIG_37 = "rack 4, host-a: config string for e3.7"


@pytest.fixture(scope="module", params=[1500, 9000], ids=["mtu1500", "mtu9000"])
def vblades(request, tmp_path_factory):
    """vblade exporting 0.1 (64 MiB), 0.2 (8 MiB, read-only) and 3.7 (16 MiB, config string)."""
    tmp = tmp_path_factory.mktemp("vblades")
    bench = Bench(request.param, tmp)
    try:
        bench.files = {
            "e0.1": make_file(tmp / "d01", 64 << 20, 4 << 20),
            "e0.2": make_file(tmp / "d02", 8 << 20, 1 << 20),
            "e3.7": make_file(tmp / "d37", 16 << 20),
        }
        bench.vblade(0, 1, bench.files["e0.1"])
        bench.vblade(0, 2, bench.files["e0.2"], "-r")
        bench.vblade(3, 7, bench.files["e3.7"])
        r = bench.aoe("cfg", "-c", "fset", "-s", CONFIG_37, "e3.7")
        assert r.returncode == 0, r.stderr
        yield bench
    finally:
        bench.close()


@pytest.mark.net
def test_discover_lists_exactly_the_exports(vblades):
    found = vblades.aoe_json("discover")
    assert [d["device"] for d in found] == ["e0.1", "e0.2", "e3.7"]
    mac = vblades.mac("tgt")
    for d in found:
        assert d["macs"] == [mac] and d["interfaces"] == [vblades.ini_if]
        assert d["buffers"] == 16
        assert d["advertised_sectors"] == (vblades.mtu - 36) // 512
    assert [d["config"] for d in found] == ["", "", CONFIG_37]
    human = vblades.aoe("discover")
    assert human.returncode == 0 and len(human.stdout.splitlines()) == 3


@pytest.mark.net
def test_64_targets_found_within_half_a_second(tmp_path):
    """64 vblade targets: one discovery with a 0.5 s window lists them all, and stat
    identifies all 64 at once."""
    bench = Bench(1500, tmp_path)
    try:
        names = ["e7.%d" % slot for slot in range(64)]
        for slot in range(64):
            bench.vblade(7, slot, make_file(tmp_path / ("t%d" % slot), (slot + 1) << 20))
        t0 = time.monotonic()
        found = bench.aoe_json("discover", "-w", "0.5")
        took = time.monotonic() - t0
        assert [d["device"] for d in found] == names
        rows = bench.aoe_json("stat", "-w", "0.5")
        assert [(d["device"], d["state"], d["size_bytes"]) for d in rows] == \
            [(name, aoe.STATE_UP, (slot + 1) << 20) for slot, name in enumerate(names)]
        print("64 targets discovered by one aoe.py discover -w 0.5 in %.2f s" % took)
    finally:
        bench.close()


@pytest.mark.net
def test_stat_json_sizes_flags_and_identify(vblades):
    rows = {d["device"]: d for d in vblades.aoe_json("stat")}
    assert sorted(rows) == ["e0.1", "e0.2", "e3.7"]
    for name, path in vblades.files.items():
        d = rows[name]
        assert d["size_bytes"] == os.path.getsize(path)
        assert d["state"] == aoe.STATE_UP and d["lba48"] is True
        assert d["model"] == "Coraid EtherDrive vblade" and d["firmware"].startswith("V")
        assert d["serial"].startswith(name[1:] + ":")
        assert d["sectors_per_frame"] == (2 if vblades.mtu == 1500 else 17)
        assert d["payload"] == d["sectors_per_frame"] * 512
    assert rows["e3.7"]["config"] == CONFIG_37
    human = vblades.aoe("stat")
    line = [l for l in human.stdout.splitlines() if "e0.1" in l][0].split()
    assert line == ["e0.1", "0.067GB", vblades.ini_if, str(rows["e0.1"]["payload"]), "up"]


@pytest.mark.net
def test_cfg_round_trip_and_aoecfg_agrees(vblades):
    need(shutil.which("aoecfg"), "needs aoetools (aoecfg)")
    ours = "set by aoe.py, read back by aoecfg here"
    assert vblades.aoe("cfg", "-c", "fset", "-s", ours, "e3.7").returncode == 0
    r = vblades.aoe("cfg", "e3.7")
    assert r.returncode == 0 and r.stdout.strip() == ours
    theirs = vblades.run(vblades.ini_ns, ["aoecfg", "-t", "2", "3", "7", vblades.ini_if],
                         timeout=10)
    assert theirs.stdout.strip() == ours
    other = "set by aoecfg, read back by aoe.py ok"
    vblades.run(vblades.ini_ns,
                ["aoecfg", "-c", "fset", "-s", other, "-t", "2", "3", "7", vblades.ini_if],
                timeout=10)
    r = vblades.aoe("cfg", "e3.7")
    assert r.stdout.strip() == other
    # set only when empty: refused by name, exit 1
    r = vblades.aoe("cfg", "-c", "set", "-s", "x", "e3.7")
    assert r.returncode == 1 and "config string present" in r.stderr
    assert vblades.aoe("cfg", "-c", "test", "-s", other, "e3.7").returncode == 0
    assert vblades.aoe("cfg", "-c", "test", "-s", "no such", "e3.7").returncode == 1
    assert vblades.aoe("cfg", "-c", "prefix", "-s", "set by aoecfg").stdout.strip() == \
        "e3.7\t" + other
    mac = vblades.mac("tgt")
    r = vblades.aoe("cfg", "--mac", mac, "-c", "fset", "-s", CONFIG_37, "e3.7")
    assert r.returncode == 0 and r.stdout.strip() == CONFIG_37


@pytest.mark.net
def test_ping_identify(vblades):
    r = vblades.aoe("ping", "-I", "0", "1", vblades.ini_if)
    assert r.returncode == 0, r.stderr
    assert "model: Coraid EtherDrive vblade" in r.stdout and "serial_number: 0.1:" in r.stdout
    assert "sectors: %d " % (64 << 11) in r.stdout
    r = vblades.aoe("ping", "-s", "1", "0", "9", vblades.ini_if)
    assert r.returncode == 1 and "e0.9: no answer" in r.stderr


@pytest.mark.net
def test_read_write_round_trip_and_read_only(vblades, data_path):
    out = os.path.join(str(vblades.tmp), "img%d" % vblades.mtu)
    r = vblades.aoe("read", "e0.1", out, "--checksum", "sha256", env=data_path)
    assert r.returncode == 0, r.stderr
    assert ("helper" if not data_path else "pure Python") in r.stderr
    with open(out, "rb") as a, open(vblades.files["e0.1"], "rb") as b:
        assert a.read() == b.read()
    data = os.urandom(3 << 20) + b"tail not sector aligned"
    src = make_file(os.path.join(str(vblades.tmp), "src"), 0)
    with open(src, "wb") as f:
        f.write(data)
    with open(vblades.files["e0.1"], "rb") as f:
        f.seek((1 << 20) + len(data))
        after = f.read(512)
    r = vblades.aoe("write", "--yes", "--offset", "1M", src, "e0.1", env=data_path)
    assert r.returncode == 0, r.stderr
    with open(vblades.files["e0.1"], "rb") as f:
        f.seek(1 << 20)
        assert f.read(len(data)) == data
        assert f.read(512 - len(data) % 512) == after[:512 - len(data) % 512]
    r = vblades.aoe("read", "e0.1", "-", "--offset", "1M", "--length", str(len(data) // 512 * 512),
                    binary=True, env=data_path)
    assert r.returncode == 0 and r.stdout == data[:len(data) // 512 * 512]
    r = vblades.aoe("write", "--yes", src, "e0.2", env=data_path)
    assert r.returncode == 1 and "read-only" in r.stderr


@pytest.mark.net
def test_reserve_blocks_others_and_mask_edits(vblades):
    stranger = "02:00:00:00:00:09"
    r = vblades.aoe("reserve", "e3.7", "--set", stranger)
    assert r.returncode == 0 and stranger in r.stdout
    try:
        r = vblades.aoe("read", "e3.7", "-", "--length", "512")
        assert r.returncode == 1 and "target is reserved" in r.stderr
        r = vblades.aoe("reserve", "e3.7", "--set")
        assert r.returncode == 1 and "target is reserved" in r.stderr and "--force" in r.stderr
    finally:
        r = vblades.aoe("reserve", "e3.7", "--release", "--force")
    assert r.returncode == 0 and "released" in r.stdout
    assert vblades.aoe("read", "e3.7", "-", "--length", "512").returncode == 0
    # vblade 25 keeps one mask entry correctly and crashes on delete (its rmmask
    # miscounts), so against vblade only one add is checked; serve's tests do the rest.
    assert vblades.aoe_json("mask", "e3.7")["masks"] == []
    me = vblades.mac("ini")
    assert vblades.aoe_json("mask", "e3.7", "--add", me)["masks"] == [me]
    assert vblades.aoe_json("mask", "e3.7")["masks"] == [me]


@pytest.mark.net
def test_sancheck_reports_fit(vblades):
    report = vblades.aoe_json("sancheck")
    assert [r["device"] for r in report] == ["e0.1", "e0.2", "e3.7"]
    for r in report:
        assert r["advice"] == []
        assert r["paths"][0]["path_sectors"] == (2 if vblades.mtu == 1500 else 17)


INJECT = r"""
import socket, sys, time
ifname, dst = sys.argv[1], bytes.fromhex(sys.argv[2].replace(':', ''))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
src = bytes.fromhex('02aabbccddee')
def hdr(verfl, shelf, slot, cmd, tag):
    return dst + src + b'\x88\xa2' + bytes([verfl, 0]) + shelf.to_bytes(2, 'big') + bytes([slot, cmd]) + tag.to_bytes(4, 'big')
frames = [dst + src + b'\x88\xa2' + b'\x18',                      # truncated header
          hdr(0x28, 0, 1, 1, 0x80000000) + bytes(40),              # version 2
          hdr(0x18, 0, 1, 1, 0x81234567) + bytes(8),               # unsolicited response
          hdr(0x18, 0, 1, 1, 0x80000000) + b'\x00\x10\x00\x00\x02\x10\x03\xff',   # config length past end
          hdr(0x10, 0, 1, 1, 0x80000000) + bytes(40),              # a request, not a response
          hdr(0x18, 0, 1, 0, 0xC0000001) + bytes(12)]              # unknown data tag
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    s.send(frames[0])                                             # runt: veth carries it as is
    for f in frames[1:]:
        s.send(f + bytes(max(0, 60 - len(f))))
    time.sleep(0.01)
"""


@pytest.mark.net
def test_garbage_frames_are_dropped_and_counted(vblades, data_path):
    injector = vblades.start(vblades.tgt_ns, [sys.executable, "-c", INJECT, vblades.tgt_if,
                                              vblades.mac("ini"), "4"])
    try:
        time.sleep(0.3)
        r = vblades.aoe("discover", "-v", "-w", "1.5")
        assert r.returncode == 0 and "Traceback" not in r.stderr
        assert len(r.stdout.splitlines()) == 3
        counts = dict(item.rsplit(" ", 1) for item in
                      r.stderr.split("dropped frames: ", 1)[1].strip().split(", "))
        for reason in ("short", "version", "unsolicited", "not_response"):
            assert int(counts.get(reason, 0)) > 0, (reason, r.stderr)
        out = os.path.join(str(vblades.tmp), "inj%d" % vblades.mtu)
        r = vblades.aoe("read", "e0.1", out, "--length", "8M", "-v", env=data_path)
        assert r.returncode == 0, r.stderr
        with open(out, "rb") as a, open(vblades.files["e0.1"], "rb") as b:
            assert a.read() == b.read(8 << 20)
    finally:
        injector.kill()


@pytest.mark.net
def test_bad_input_gives_one_line_and_exit_code(vblades):
    cases = [
        (("stat", "e0"), 2, "not an AoE device name"),
        (("discover", "--iface", "nosuchif0"), 2, "nosuchif0: no such network interface"),
        (("ping", "0", "1", "lo"), 2, "lo is not an Ethernet interface"),
        (("read", "e0.1", "-", "--offset", "100"), 2, "not a multiple of 512"),
        (("read", "e9.9", "-"), 1, "e9.9: no answer"),
        (("cfg", "-c", "fset", "e3.7"), 2, "needs the new string"),
        (("bench", "e0.1", "--qd", "0"), 2, "must be greater than 0"),
        (("read", "--bogus", "e0.1", "-"), 2, "unrecognized arguments: --bogus"),
        (("read",), 2, "read: the following arguments are required"),
    ]
    for args, code, text in cases:
        r = vblades.aoe(*args)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert r.stderr.count("\n") == 1 and text in r.stderr, (args, r.stderr)
        assert not r.stderr.startswith("aoe.py: aoe.py"), r.stderr   # the name said once
    r = vblades.run(vblades.ini_ns,
                    ["ip", "link", "add", "down0", "type", "veth", "peer", "name", "down1"])
    assert r.returncode == 0, r.stderr
    r = vblades.aoe("discover", "--iface", "down0")
    assert r.returncode == 2 and "down0 is down" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.net
def test_without_privilege_says_so(vblades):
    need(shutil.which("setpriv"), "needs setpriv (util-linux)")
    r = vblades.run(vblades.ini_ns, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                     "--inh-caps=-all", sys.executable, AOE_PY, "discover",
                                     "--iface", vblades.ini_if])
    assert r.returncode == 2 and "need root or CAP_NET_RAW" in r.stderr and \
        r.stderr.count("\n") == 1


# -----------------------------------------------------------------------------
# net: aoe.py serve as the target
# -----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[1500, 9000], ids=["mtu1500", "mtu9000"])
def served(request, tmp_path_factory):
    """aoe.py serve exporting 1.1 (32 MiB of random data) and 1.2 (read-only, offset window)."""
    tmp = tmp_path_factory.mktemp("served")
    bench = Bench(request.param, tmp)
    try:
        bench.files = {"e1.1": make_file(tmp / "s11", 32 << 20, 32 << 20),
                       "e1.2": make_file(tmp / "s12", 4 << 20, 4 << 20)}
        bench.start(bench.tgt_ns, [sys.executable, AOE_PY, "serve", "1", "1", bench.tgt_if,
                                   bench.files["e1.1"]], ready="pid ")
        bench.start(bench.tgt_ns,
                    [sys.executable, AOE_PY, "serve", "-r", "-o", "1M", "-l", "2M", "1", "2",
                     bench.tgt_if, bench.files["e1.2"]], ready="pid ")
        yield bench
    finally:
        bench.close()


@pytest.mark.net
def test_serve_discovered_with_window_and_identify(served):
    rows = {d["device"]: d for d in served.aoe_json("stat")}
    assert sorted(rows) == ["e1.1", "e1.2"]
    assert rows["e1.1"]["size_bytes"] == 32 << 20 and rows["e1.2"]["size_bytes"] == 2 << 20
    assert rows["e1.1"]["advertised_sectors"] == aoe.frame_sectors(served.mtu)
    assert rows["e1.1"]["lba48"] and rows["e1.1"]["serial"].startswith("1.1:")


@pytest.mark.net
def test_serve_read_write_and_window(served):
    out = os.path.join(str(served.tmp), "s11.img")
    assert served.aoe("read", "e1.1", out).returncode == 0
    with open(out, "rb") as a, open(served.files["e1.1"], "rb") as b:
        assert a.read() == b.read()
    r = served.aoe("read", "e1.2", "-", binary=True)
    with open(served.files["e1.2"], "rb") as f:
        f.seek(1 << 20)
        assert r.returncode == 0 and r.stdout == f.read(2 << 20)
    src = make_file(os.path.join(str(served.tmp), "w"), 0)
    with open(src, "wb") as f:
        f.write(os.urandom(1 << 20))
    r = served.aoe("write", "--yes", src, "e1.2")
    assert r.returncode == 1 and "read-only" in r.stderr
    r = served.aoe("write", "--yes", "--offset", "31M", src, "e1.1")
    assert r.returncode == 0, r.stderr
    with open(served.files["e1.1"], "rb") as f, open(src, "rb") as g:
        f.seek(31 << 20)
        assert f.read() == g.read()
    r = served.aoe("read", "e1.1", "-", "--offset", "31M", "--length", "2M")
    assert r.returncode == 2 and "past its end" in r.stderr


@pytest.mark.net
def test_aoetools_against_serve(served):
    need(shutil.which("aoeping") and shutil.which("aoecfg"), "needs aoetools")
    r = served.run(served.ini_ns, ["aoeping", "-I", "-s", "5", "1", "1", served.ini_if], timeout=10)
    assert r.returncode == 0, r.stderr
    assert "model: aoe.py export" in r.stdout and "serial_number: 1.1:" in r.stdout
    r = served.run(served.ini_ns,
                   ["aoecfg", "-c", "fset", "-s", "short", "-t", "2", "1", "1", served.ini_if],
                   timeout=10)
    assert r.stdout.strip() == "short"
    assert served.aoe("cfg", "e1.1").stdout.strip() == "short"
    assert served.aoe("cfg", "-c", "fset", "-s", "from aoe.py", "e1.1").returncode == 0
    r = served.run(served.ini_ns, ["aoecfg", "-t", "2", "1", "1", served.ini_if], timeout=10)
    assert r.stdout.strip() == "from aoe.py"
    r = served.run(served.ini_ns,
                   ["aoecfg", "-c", "set", "-s", "other", "-t", "2", "1", "1", served.ini_if],
                   timeout=10)
    assert r.stdout.strip() == "*badcfg*"


@pytest.mark.net
def test_aoetools_drop_in_acts_like_aoetools(served, tmp_path):
    """aoe.py run under aoetools' names (links made by `aoe.py links`): aoeping, aoecfg and
    aoe-sancheck print what the real tools print for the same targets, with their exit codes;
    aoe-stat, aoe-interfaces, aoe-flush, aoe-revalidate and aoe-version take their arguments
    and answer in their format."""
    need(all(shutil.which(t) for t in ("aoeping", "aoecfg", "aoe-sancheck")), "needs aoetools")
    # links makes its target executable: a copy of ours
    copy = tmp_path / "aoe.py"
    shutil.copy(AOE_PY, copy)
    assert subprocess.run([sys.executable, str(copy), "links",
                           str(tmp_path / "bin")]).returncode == 0
    ifname = served.ini_if

    def run(tool, *args, ours=True):
        argv = ([str(tmp_path / "bin" / tool) if ours else tool]
                + [a.replace("IF", ifname) for a in args])
        return subprocess.run(served.argv(served.ini_ns, argv), capture_output=True, text=True,
                              timeout=60, env=served.env())

    def same(tool, *args, masked=lambda text: text):
        real, ours = run(tool, *args, ours=False), run(tool, *args)
        assert (ours.returncode, masked(ours.stdout)) == (real.returncode, masked(real.stdout)), \
            (tool, args)
        return ours
    # the query's tag
    tagless = lambda text: "\n".join(line for i, line in enumerate(text.splitlines())
                                     if not line.startswith("tag:") and i != 6)
    assert "found e1.1 with mac" in same("aoeping", "-v", "-s", "3", "1", "1", "IF",
                                         masked=tagless).stdout
    assert "model: aoe.py export" in same("aoeping", "-I", "-s", "3", "1", "1", "IF").stdout
    assert "device identify response:" in same("aoeping", "-i", "-s", "3", "1", "2", "IF").stdout
    # its timer ends it
    assert same("aoeping", "-s", "1", "1", "9", "IF").returncode == -signal.SIGALRM
    assert same("aoeping", "1").returncode == 1
    assert same("aoecfg", "-c", "fset", "-s", "drop-in", "-t", "2", "1", "1", "IF").stdout == \
        "drop-in\n"
    assert same("aoecfg", "-t", "2", "1", "1", "IF").stdout == "drop-in\n"
    assert same("aoecfg", "-c", "bogus").returncode == 1
    assert "e1.2\t   1\t" in same("aoe-sancheck").stdout

    r = run("aoe-stat")
    assert r.returncode == 0, r.stderr
    rows, payload = r.stdout.splitlines(), aoe.frame_sectors(served.mtu) * 512
    assert [line.split() for line in rows] == [
        ["e1.1", "0.033GB", ifname, str(payload), "up"],
        ["e1.2", "0.002GB", ifname, str(payload), "up"]], rows
    assert rows[0] == "%10s %15s %10s %-5s %-14s" % ("e1.1", "0.033GB", ifname, payload, "up")
    # patterns are grep's regular expressions over the whole line, as in aoe-stat: the dots
    # escaped, or "e1.2" would also match an interface named like "aoetes20e152bi"
    assert run("aoe-stat", r"e1\.2").stdout.split() == rows[1].split()
    assert run("aoe-stat", r"e7\.7").returncode == 1

    assert (run("aoe-interfaces").stdout, run("aoe-interfaces", "IF").returncode) == ("\n", 0)
    assert run("aoe-interfaces").stdout == ifname + "\n"
    r = run("aoe-interfaces", "nosuch0")
    assert (r.returncode, r.stderr) == \
        (1, 'aoe-interfaces Error: "nosuch0" is not a network interface\n')
    assert run("aoe-interfaces", "-c", "x").returncode == 1
    assert run("aoe-interfaces", "-c").returncode == 0 and run("aoe-interfaces").stdout == "\n"
    r = run("aoe-flush", "e9.9")
    assert (r.returncode, r.stderr) == (1, 'aoe-flush Error: "e9.9" is not an aoe device\n')
    assert run("aoe-revalidate").returncode == 1
    r = run("aoe-revalidate", "e1.1")
    assert (r.returncode, r.stdout) == (0, ""), r.stderr
    assert run("aoe-discover").returncode == 0
    assert run("aoe-version").stdout.startswith("              aoetools:\taoe.py ")


@pytest.mark.net
def test_socket_filter_keeps_only_one_targets_frames(served):
    """Port.keep_only (a classic BPF socket filter): a port kept to e1.2 hears e1.2's answers
    to a broadcast Query Config and nothing of e1.1's, where an unfiltered port hears both."""
    script = """
import sys, time
sys.path.insert(0, %r)
import aoe
kept, plain = aoe.open_ports([sys.argv[1]]), aoe.open_ports([sys.argv[1]])
kept[0].keep_only(1, 2)
control = aoe.Control(plain)
heard = {}
for name, ports in (("plain", plain), ("kept", kept)):
    control.ports = ports
    heard[name] = sorted({(f.shelf, f.slot) for _, f, _ in control.query_config(wait=0.5, announced=True)})
print(heard)
""" % HERE
    r = served.run(served.ini_ns, [sys.executable, "-c", script, served.ini_if])
    assert r.returncode == 0, r.stderr
    assert eval(r.stdout) == {"plain": [(1, 1), (1, 2)], "kept": [(1, 2)]}


@pytest.mark.net
def test_systemd_units_verify(tmp_path):
    """The units `systemd-units` writes pass systemd-analyze verify without a warning (the
    template as an instance), and run this aoe.py as the service manager would."""
    need(shutil.which("systemd-analyze"), "needs systemd-analyze (apt-get install systemd)")
    r = subprocess.run([sys.executable, AOE_PY, "systemd-units", "--dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shutil.copy(tmp_path / "aoe@.service", tmp_path / "aoe@e0.1.service")
    for unit in ("aoe@e0.1.service", "aoe-all.service"):
        v = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True,
                           text=True, cwd=str(tmp_path))
        assert (v.returncode, v.stderr.strip()) == (0, ""), (unit, v.stderr)
        text = (tmp_path / unit).read_text()
        assert "Type=notify" in text and "After=network-online.target" in text
    assert "ExecStart=%s %s attach --foreground %%i" \
        % (sys.executable, os.path.abspath(AOE_PY)) in (tmp_path / "aoe@.service").read_text()
    assert "attach --all --watch" in (tmp_path / "aoe-all.service").read_text()


@pytest.mark.net
def test_pip_install_gives_the_aoe_command(tmp_path):
    """A wheel built from the project (pip, build isolation) installs the `aoe` command and
    its manual page (as `aoe man` prints it) into a fresh venv with the helper compiled; where
    the C compiler fails, it installs anyway and aoe runs pure Python; both discover a vblade
    target in the test's namespaces."""
    bench = Bench(1500, tmp_path)
    try:
        bench.vblade(4, 2, make_file(tmp_path / "img", 8 << 20))
        for kind, env in (("built", {}), ("not built", {"CC": "/bin/false"})):
            source = tmp_path / ("src-" + kind.replace(" ", "-"))    # a build of its own each
            source.mkdir()
            for name in ("aoe.py", "_aoeio.c", "build_ffi.py", "setup.py", "pyproject.toml",
                         "README.md"):
                shutil.copy(os.path.join(HERE, name), source / name)
            venv = tmp_path / ("venv-" + kind.replace(" ", "-"))
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            dist = tmp_path / ("dist-" + kind.replace(" ", "-"))
            r = subprocess.run([str(venv / "bin" / "pip"), "wheel", "-q", "--no-cache-dir", "-w",
                                str(dist), str(source)], capture_output=True, text=True,
                               env=dict(os.environ, **env), timeout=600)
            assert r.returncode == 0, r.stderr[-2000:]
            wheel = [w for w in os.listdir(str(dist)) if w.startswith("aoe_py-")]
            r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(dist / wheel[0])],
                               capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-2000:]
            r = subprocess.run([str(venv / "bin" / "aoe"), "version"], capture_output=True,
                               text=True)
            assert r.returncode == 0 and "helper %s" % kind in r.stdout, (kind, r.stdout, r.stderr)
            page = venv / "share" / "man" / ("man%d" % aoe.MAN_SECTION) / aoe.MAN_PAGE
            assert page.is_file(), (kind, sorted(os.listdir(str(venv))))
            r = subprocess.run([str(venv / "bin" / "aoe"), "man"], capture_output=True, text=True)
            assert (r.returncode, r.stdout) == (0, page.read_text()), (kind, r.stderr)
            r = subprocess.run(bench.argv(bench.ini_ns,
                                          [str(venv / "bin" / "aoe"), "discover", "--json"]),
                               capture_output=True, text=True, env=bench.env(), timeout=60)
            assert r.returncode == 0, r.stderr
            assert [d["device"] for d in json.loads(r.stdout)] == ["e4.2"]
    finally:
        bench.close()


EXCHANGE = r"""
import socket, sys, time
# argv: interface; stdin: request frames in hex.  Prints one answer per request
# (hex, or '-' for silence): the first response carrying the request's tag.
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88A2))
s.bind((sys.argv[1], 0x88A2))
s.settimeout(0.05)
answers = []
for request in [bytes.fromhex(h) for h in sys.stdin.read().split()]:
    s.send(request)
    answer, deadline = "-", time.monotonic() + 0.5
    while answer == "-" and time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        if len(data) >= 24 and data[14] & 0x08 and data[20:24] == request[20:24]:
            answer = data.hex()
    answers.append(answer)
print(" ".join(answers))
"""


def wire_answers(bench, requests):
    """Send requests one at a time from the initiator side; each one's answer or None."""
    r = subprocess.run(bench.argv(bench.ini_ns, [sys.executable, "-c", EXCHANGE, bench.ini_if]),
                       input=" ".join(f.hex() for f in requests), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [None if h == "-" else bytes.fromhex(h) for h in r.stdout.split()]


def comparable(kind, answer):
    """What of an answer both targets must agree on: every field but the firmware
    version, data after an error (padding) and, of IDENTIFY, all but addressing
    and capacity (serve also reports ATA versions, FLUSH CACHE and a write cache).
    FLUSH CACHE answers are compared by header only: vblade aborts them."""
    if answer is None:
        return None
    f = aoe.parse_frame(answer)
    head = (f.flags, f.error, f.shelf, f.slot, f.command, f.tag, f.dst)
    if f.is_error:
        return head
    if kind == "cfg":
        c = aoe.parse_cfg(f)
        return head + (c.bufcnt, c.scnt, c.aoever, c.ccmd, c.config)
    if kind == "mask":
        m = aoe.parse_mask(f)
        return head + (m.mcmd, m.merror, m.directives)
    if kind == "reserve":
        r = aoe.parse_reserve(f)
        return head + (r.rcmd, r.macs)
    # vblade aborts FLUSH CACHE (EXT); serve carries them out
    if kind == "flush":
        return head
    a = aoe.parse_ata(f)
    fields = head + (a.aflags, a.err_feature, a.count, a.cmd_status, a.lba)
    if kind == "identify":                  # what initiators use: addressing and capacity
        w = aoe.Identify(bytes(a.data[:512])).words
        return fields + (w[49] & 1 << 9, w[60], w[61], w[83] & 1 << 10, w[86] & 1 << 10, w[100:104])
    if kind.startswith("read") and not a.cmd_status & aoe.ATA_ERR:
        return fields + (bytes(a.data[:int(kind[4:]) * 512]),)
    return fields


@pytest.mark.net
@pytest.mark.parametrize("mtu", [1500, 9000])
def test_serve_answers_like_vblade(tmp_path, mtu):
    """The same requests, on the wire, to vblade and then to serve (same file, same
    shelf.slot, same options): the answers agree field by field."""
    bench = Bench(mtu, tmp_path)
    try:
        sectors = 4096
        rw = make_file(tmp_path / "rw", sectors * 512, sectors * 512)
        ro = make_file(tmp_path / "ro", sectors * 512, sectors * 512)
        with open(rw, "rb") as f:
            pristine = f.read()
        me, them = aoe.parse_mac(bench.mac("ini")), aoe.parse_mac(bench.mac("tgt"))
        scnt = aoe.frame_sectors(mtu)
        tags = iter(range(0x100, 0x10000))

        def ata(kind, slot, cmd, lba=0, count=0, aflags=aoe.AOEAFL_EXT, data=b""):
            ext = aflags & aoe.AOEAFL_EXT
            return kind, aoe.pack_ata(them, me, 9, slot, next(tags),
                                      aoe.AtaFields(aflags, 0, count, cmd,
                                                    lba if ext else lba & 0x0FFFFFFF, data))

        def cfg(slot, ccmd, config=b""):
            return "cfg", aoe.pack_cfg(them, me, 9, slot, next(tags),
                                       aoe.ConfigInfo(ccmd=ccmd, config=config))

        write, read = aoe.ATA_CMD_PIO_WRITE_EXT, aoe.ATA_CMD_PIO_READ_EXT
        payload = bytes(range(256)) * 2 * scnt
        requests = [
            cfg(9, aoe.AOECCMD_READ),
            cfg(9, aoe.AOECCMD_SET, b"first"),
            cfg(9, aoe.AOECCMD_SET, b"second"),                      # refused: already set
            cfg(9, aoe.AOECCMD_TEST, b"other"),                     # silent: no match
            cfg(9, aoe.AOECCMD_PTEST, b"fir"),
            cfg(9, aoe.AOECCMD_FSET, b"forced"),
            cfg(9, 9),                                              # unknown sub-command
            # any shelf
            ("cfg", aoe.pack_cfg(aoe.BROADCAST_MAC, me, 0xFFFF, 9, next(tags), aoe.ConfigInfo())),
            ata("identify", 9, aoe.ATA_CMD_ID_ATA, count=1, aflags=0),
            ata("identify", 8, aoe.ATA_CMD_ID_ATA, count=1, aflags=0),
            ata("read%d" % scnt, 9, read, 7, scnt),
            ata("read2", 9, aoe.ATA_CMD_PIO_READ, 0x123, 2, aflags=0),   # LBA28
            ata("read1", 9, read, sectors - 1, 1),
            ata("read2", 9, read, sectors - 1, 2),                  # runs past the end
            ata("read1", 9, read, sectors, 1),
            ata("read1", 9, read, 1 << 40, 1),
            ata("write", 9, write, 100, scnt, aoe.AOEAFL_EXT | aoe.AOEAFL_WRITE, payload),
            ata("read%d" % scnt, 9, read, 100, scnt),
            ata("write", 9, aoe.ATA_CMD_PIO_WRITE, 300, 1, aoe.AOEAFL_WRITE, payload[:512]),
            ata("write", 9, write, sectors - 1, 2, aoe.AOEAFL_EXT | aoe.AOEAFL_WRITE,
                payload[:1024]),
            # read-only
            ata("write", 8, write, 5, 1, aoe.AOEAFL_EXT | aoe.AOEAFL_WRITE, payload[:512]),
            ata("flush", 9, aoe.ATA_CMD_FLUSH_EXT),
            ata("flush", 9, aoe.ATA_CMD_FLUSH, aflags=0),
            ata("power", 9, aoe.ATA_CMD_CHK_POWER, aflags=0),
            ata("other", 9, 0x99),                                   # unknown ATA command
            ("mask", aoe.pack_mask(them, me, 9, 9, next(tags), aoe.MaskInfo())),
            ("reserve", aoe.pack_reserve(them, me, 9, 9, next(tags), aoe.ReserveInfo())),
            # unknown AoE command
            ("other", aoe.pack_header(them, me, 9, 9, 9, next(tags)) + bytes(40)),
        ]
        frames = [frame for _, frame in requests]
        results, files = {}, {}
        for name, argv in (("vblade", ["vblade"]), ("serve", [sys.executable, AOE_PY, "serve"])):
            if name == "vblade":
                need(shutil.which("vblade"), "needs vblade (apt-get install vblade)")
            for path in (rw, ro):
                with open(path, "wb") as f:
                    f.write(pristine)
            procs = [bench.start(bench.tgt_ns, argv + ["-b", "16", "9", "9", bench.tgt_if, rw],
                                 ready="pid "),
                     bench.start(bench.tgt_ns,
                                 argv + ["-b", "16", "-r", "9", "8", bench.tgt_if, ro],
                                 ready="pid ")]
            try:
                results[name] = wire_answers(bench, frames)
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.wait(10)
            with open(rw, "rb") as f:
                files[name] = f.read()
        assert len(results["vblade"]) == len(results["serve"]) == len(requests)
        differ = ["%s %s: serve %r, vblade %r"
                  % (kind, frame[:40].hex(), comparable(kind, ours), comparable(kind, theirs))
                  for (kind, frame), theirs, ours in zip(requests, results["vblade"],
                                                         results["serve"])
                  if comparable(kind, ours) != comparable(kind, theirs)]
        assert not differ, "\n".join(differ)
        assert sum(answer is not None for answer in results["vblade"]) >= len(requests) - 2
        flushes = [aoe.parse_ata(aoe.parse_frame(answer))
                   for (kind, _), answer in zip(requests, results["serve"])
                   if kind == "flush"]
        assert [(a.cmd_status, a.err_feature) for a in flushes] == [(aoe.ATA_DRDY, 0)] * 2
        assert files["serve"] == files["vblade"] != pristine
    finally:
        bench.close()


@pytest.mark.net
@pytest.mark.parametrize("serve_path", ["helper", "python"])
def test_serve_block_device_direct_and_sync(tmp_path, serve_path):
    """serve exports a block device (a loop device) with -d (O_DIRECT) and a file
    with -s (O_SYNC): what aoe.py writes reads back and is in the backing store."""
    need(shutil.which("losetup"), "needs losetup (util-linux)")
    if serve_path == "helper":
        need(aoe.load_helper() is not None, "needs the compiled helper: python3 build_ffi.py")
    backing = make_file(tmp_path / "backing", 8 << 20, 8 << 20)
    loop = subprocess.run(["losetup", "--find", "--show", backing], capture_output=True, text=True)
    need(loop.returncode == 0, "needs a free loop device: %s" % loop.stderr.strip())
    device = loop.stdout.strip()
    bench = Bench(9000, tmp_path)
    try:
        synced = make_file(tmp_path / "synced", 8 << 20, 8 << 20)
        serve = ((["env", "AOE_NO_HELPER=1"] if serve_path == "python" else [])
                 + [sys.executable, AOE_PY, "serve"])
        for opts, slot, path in ((["-d"], "1", device), (["-s"], "2", synced)):
            bench.start(bench.tgt_ns, serve + opts + ["5", slot, bench.tgt_if, path], ready="pid ")
        data = os.urandom(3 << 20)
        src = tmp_path / "src"
        src.write_bytes(data)
        for name in ("e5.1", "e5.2"):
            r = bench.aoe("write", "--yes", "--offset", "1M", str(src), name)
            assert r.returncode == 0, r.stderr
            r = bench.aoe("read", name, "-", "--offset", "1M", "--length", "3M", binary=True)
            assert r.returncode == 0 and r.stdout == data, r.stderr
        subprocess.run(["blockdev", "--flushbufs", device], check=True)
        for path in (backing, synced):
            with open(path, "rb") as f:
                f.seek(1 << 20)
                assert f.read(3 << 20) == data
    finally:
        bench.close()
        subprocess.run(["losetup", "-d", device])


def nobody_account():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        need(False, "needs a user 'nobody', serve's default --user")


def start_serve(bench, argv, env=()):
    """aoe.py serve in the target namespace: its pid (that of serve itself, not of the
    wrapper the bench starts it in), its start-up line and its log."""
    log = os.path.join(str(bench.tmp), "proc%d.log" % len(bench.procs))
    bench.start(bench.tgt_ns, ["env"] + ["%s=%s" % kv for kv in env]
                + [sys.executable, AOE_PY, "serve"] + list(argv), ready="pid ")
    with open(log) as f:
        line = re.search(r"^pid (\d+): .*$", f.read(), re.M)
    return int(line.group(1)), line.group(0), log


def thread_credentials(pid):
    """Each thread of process pid: its four uids, its four gids and CapEff."""
    threads = []
    for path in sorted(glob.glob("/proc/%d/task/*/status" % pid)):
        with open(path) as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        threads.append(([int(w) for w in fields["Uid"].split()],
                        [int(w) for w in fields["Gid"].split()], int(fields["CapEff"], 16)))
    return threads


@pytest.mark.net
@pytest.mark.parametrize("serve_path", ["helper", "python"])
def test_serve_gives_up_root_once_it_listens(tmp_path, serve_path):
    """Started as root with default options, serve runs as nobody, in every thread, without
    a capability; it still writes and reads an image only root can open (it opened it
    before), stops on SIGTERM and reports with -v."""
    nobody = nobody_account()
    if serve_path == "helper":
        need(aoe.load_helper() is not None, "needs the compiled helper: python3 build_ffi.py")
    env = [("AOE_SERVE_THREADS", "2")] if serve_path == "helper" else [("AOE_NO_HELPER", "1")]
    bench = Bench(9000, tmp_path)
    try:
        image = make_file(tmp_path / "root-only", 8 << 20, 8 << 20)
        os.chmod(image, 0o600)
        assert os.stat(image).st_uid == 0
        pid, line, log = start_serve(bench, ["-v", "7", "1", bench.tgt_if, image], env)
        assert line.endswith(", as user nobody (uid %d, gid %d)" % (nobody.pw_uid, nobody.pw_gid))
        data_threads = re.search(r"helper, (\d+) threads? data path", line)
        assert (data_threads is not None) == (serve_path == "helper"), line
        data = os.urandom(2 << 20)
        src = tmp_path / "src"
        src.write_bytes(data)
        r = bench.aoe("write", "--yes", "--offset", "1M", str(src), "e7.1")
        assert r.returncode == 0, r.stderr
        r = bench.aoe("read", "e7.1", "-", "--offset", "1M", "--length", "2M", binary=True)
        assert r.returncode == 0 and r.stdout == data, r.stderr
        with open(image, "rb") as f:
            f.seek(1 << 20)
            assert f.read(2 << 20) == data
        threads = thread_credentials(pid)
        assert len(threads) == 1 + (int(data_threads.group(1)) if data_threads else 0)
        assert threads == [([nobody.pw_uid] * 4, [nobody.pw_gid] * 4, 0)] * len(threads)
        wrapper = bench.procs[-1]
        wrapper.terminate()
        assert wrapper.wait(10) == 0
        with open(log) as f:
            said = f.read()
        written = re.search(r"^served .*'sectors_written': (\d+)", said, re.M)
        assert written and int(written.group(1)) >= 4096, said
    finally:
        bench.close()


@pytest.mark.net
def test_serve_user_root_keeps_root_and_an_unknown_user_is_refused(tmp_path):
    bench = Bench(1500, tmp_path)
    try:
        image = make_file(tmp_path / "image", 1 << 20, 1 << 20)
        pid, line, _ = start_serve(bench, ["--user", "root", "7", "2", bench.tgt_if, image])
        assert line.endswith(", as user root (uid 0, gid 0)")
        threads = thread_credentials(pid)
        assert threads and all(uids == [0] * 4 and caps for uids, _, caps in threads)
        r = bench.aoe("read", "e7.2", "-", "--length", "4k", binary=True)
        with open(image, "rb") as f:
            assert r.returncode == 0 and r.stdout == f.read(4096)
        r = bench.run(bench.tgt_ns, [sys.executable, AOE_PY, "serve", "--user", "no-such-user",
                                     "7", "3", bench.tgt_if, image])
        assert (r.returncode, r.stdout) == (2, "")
        assert r.stderr.splitlines() == ["aoe.py: --user no-such-user: no such user"]
    finally:
        bench.close()


BECOME_NOBODY = r"""
import ctypes, os, pwd, sys
sys.path.insert(0, sys.argv[1])
import aoe
nobody = pwd.getpwnam("nobody")
if sys.argv[2] == "saved-uid-kept":
    switch = os.setuid
    os.setuid = lambda uid: os.setresuid(uid, uid, 0) if uid else switch(uid)
elif sys.argv[2] == "capabilities-kept":
    ctypes.CDLL(None).prctl(8, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                            ctypes.c_ulong(0))                     # PR_SET_KEEPCAPS
try:
    aoe.become(nobody)
except aoe.AoeError as e:
    sys.exit(str(e))
print(os.getresuid(), os.getresgid(), os.getgroups())
"""


@pytest.mark.net
@pytest.mark.parametrize("flaw", ["none", "saved-uid-kept", "capabilities-kept"])
def test_serve_refuses_a_switch_of_user_that_can_be_undone(flaw):
    """become() as root: a clean switch to nobody, or, when the switch leaves a way back (the
    saved uid still 0, capabilities kept in the permitted set), a refusal."""
    need(os.geteuid() == 0, "needs root to switch users")
    nobody = nobody_account()
    r = subprocess.run([sys.executable, "-c", BECOME_NOBODY, HERE, flaw], capture_output=True,
                       text=True, timeout=60)
    if flaw == "none":
        ids = "(%d, %d, %d)" % ((nobody.pw_uid,) * 3), "(%d, %d, %d)" % ((nobody.pw_gid,) * 3)
        assert (r.returncode, r.stdout, r.stderr) == (0, "%s %s []\n" % ids, "")
    else:
        said = {"saved-uid-kept": "setuid(0) still works", "capabilities-kept": "has CapPrm"}
        assert r.returncode == 1 and r.stderr.startswith("--user nobody: still privileged ")
        assert said[flaw] in r.stderr and r.stderr.endswith("refusing to serve\n")


@pytest.mark.codec
def test_serve_account_switches_only_from_root(monkeypatch):
    nobody = nobody_account()
    monkeypatch.setattr(aoe.os, "geteuid", lambda: 0)
    assert aoe.serve_account(None) == aoe.serve_account(str(nobody.pw_uid)) == nobody
    assert aoe.serve_account("root") is None and aoe.serve_account("0") is None
    with pytest.raises(aoe.AoeError, match="^--user no-such-user: no such user$"):
        aoe.serve_account("no-such-user")
    monkeypatch.setattr(aoe.os, "geteuid", lambda: nobody.pw_uid)
    assert aoe.serve_account(None) is None and aoe.serve_account("nobody") is None
    with pytest.raises(aoe.AoeError, match="^--user root: only root can switch users"):
        aoe.serve_account("root")


@pytest.mark.net
def test_serve_mask_and_reserve(served):
    path = make_file(os.path.join(str(served.tmp), "masked"), 1 << 20, 1 << 20)
    served.start(served.tgt_ns, [sys.executable, AOE_PY, "serve", "2", "3", served.tgt_if, path],
                 ready="pid ")
    me, stranger = served.mac("ini"), "02:00:00:00:00:09"
    r = served.aoe("reserve", "e2.3", "--set", stranger)
    assert r.returncode == 0 and stranger in r.stdout
    r = served.aoe("read", "e2.3", "-", "--length", "4k")
    assert r.returncode == 1 and "target is reserved" in r.stderr
    assert served.aoe("reserve", "e2.3", "--release", "--force").returncode == 0
    assert served.aoe("read", "e2.3", "-", "--length", "4k").returncode == 0
    assert served.aoe_json("mask", "e2.3", "--add", me, "--add", stranger)["masks"] == \
        [me, stranger]
    assert served.aoe_json("mask", "e2.3", "--delete", stranger)["masks"] == [me]
    assert served.aoe_json("mask", "e2.3", "--delete", me)["masks"] == []
    assert served.aoe_json("mask", "e2.3", "--add", stranger)["masks"] == [stranger]
    r = served.aoe("stat", "e2.3", "-w", "0.5")         # masked out: the target stays silent to us
    assert r.returncode == 1 and "no AoE target answered" in r.stderr


@pytest.mark.net
def test_engine_survives_faulty_target(served, data_path):
    """Dropped, duplicated and reordered answers still give identical data."""
    slot = "6" if data_path else "1"                 # one target per data path
    path = make_file(os.path.join(str(served.tmp), "faulty" + slot), 8 << 20, 8 << 20)
    served.start(served.tgt_ns,
                 [sys.executable, AOE_PY, "serve", "--fault-drop", "0.05", "--fault-duplicate",
                  "0.05", "--fault-reorder", "0.05", "--fault-seed", "7", "2", slot, served.tgt_if,
                  path], ready="pid ")
    out = os.path.join(str(served.tmp), "faulty%s.img" % slot)
    r = served.aoe("read", "e2." + slot, out, "-v", env=data_path)
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as a, open(path, "rb") as b:
        assert a.read() == b.read()
    src = os.path.join(str(served.tmp), "faulty%s.src" % slot)
    with open(src, "wb") as f:
        f.write(os.urandom(4 << 20))
    r = served.aoe("write", "--yes", src, "e2." + slot, env=data_path)
    assert r.returncode == 0, r.stderr
    with open(path, "rb") as a, open(src, "rb") as b:
        assert a.read(4 << 20) == b.read()


ENGINE_REQUESTS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import aoe
# argv: aoe.py's directory, interface, device, file for the data read; stdin: JSON
# [[op, lba, count], ...], op "read" or "write" (written sectors hold bytes 0xA5).  At
# most 64 requests in flight, each next one submitted as one finishes.  Prints JSON
# [[index, status], ...] in the order they finished; the reads' buffers, in the order
# asked, go to the file.
plan = json.load(sys.stdin)
control = aoe.Control(aoe.open_ports([sys.argv[2]]))
engine = aoe.Engine(aoe.find_target(control, sys.argv[3]), helper=aoe.load_helper())
bufs = [bytearray(b"\xa5" * 512 * count if op == "write" else 512 * count)
        for op, _, count in plan]
ids, finished, sent = {}, [], 0
while len(finished) < len(plan):
    while sent < len(plan) and len(ids) < 64:
        op, lba, count = plan[sent]
        rid = engine.submit(aoe.OP_WRITE if op == "write" else aoe.OP_READ, lba, count, bufs[sent])
        ids[rid], sent = sent, sent + 1
    finished += [[ids.pop(rid), status] for rid, status in engine.poll(20000)]
with open(sys.argv[4], "wb") as f:
    for (op, _, _), buf in zip(plan, bufs):
        if op == "read":
            f.write(buf)
print(json.dumps(finished))
"""


def engine_requests(bench, device, plan):
    """Requests through aoe.py's Engine in the initiator namespace: [[index, status], ...]
    in the order they finished, and the data read."""
    out = os.path.join(str(bench.tmp), "engine-%s.data" % device)
    r = subprocess.run(bench.argv(bench.ini_ns, [sys.executable, "-c", ENGINE_REQUESTS, HERE,
                                                 bench.ini_if, device, out]),
                       input=json.dumps(plan), capture_output=True, text=True, env=bench.env(),
                       timeout=180)
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as f:
        return json.loads(r.stdout), f.read()


def stop_serve(pid, log):
    """SIGTERM to a serve started with -v; the statistics it prints on its way out."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(log) as f:
            said = re.search(r"^served \{(.*)\}; dropped", f.read(), re.M)
        if said:
            return {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", said.group(1))}
        time.sleep(0.05)
    pytest.fail("serve %d did not stop and report" % pid)


def serve_with_unreadable_sectors(served, serve_path, slot, options, size):
    """serve --fault-bad ... -v as e6.SLOT on the given data path: (pid, log, export)."""
    if serve_path == "helper":
        need(aoe.load_helper() is not None, "needs the compiled helper: python3 build_ffi.py")
    path = make_file(os.path.join(str(served.tmp), "unreadable%d" % slot), size, size)
    pid, line, log = start_serve(served, ["-v"] + options + ["6", str(slot), served.tgt_if, path],
                                 env=[("AOE_NO_HELPER", "1")] if serve_path == "python" else [])
    assert ("helper, " in line) == (serve_path == "helper"), line     # not turned off by it
    assert "UNREADABLE SECTORS" in line and "FAULT INJECTION" not in line, line
    return pid, log, path


# of a 4 MiB export (8192 sectors): the first and last, single ones, a 64 KiB area
UNREADABLE = "0, 100, 0x801, 3000+128, 5000-5001, 8191"


@pytest.mark.net
@pytest.mark.parametrize("serve_path, error", [("helper", "abrt"), ("python", "unc")])
def test_serve_fault_bad_fails_exactly_the_unreadable_sectors(served, serve_path, error):
    """serve --fault-bad (on the command line to the helper's fast path, from a file to the
    pure-Python one): every other sector reads back right through the engine, every one of
    the set fails with the ATA error asked for; a frame whose first unreadable sector is k
    sectors in is answered, on the wire, with exactly the k sectors before it, status
    ERR|DRDY and the count of sectors not transferred (as vblade answers a short pread)."""
    listed = os.path.join(str(served.tmp), "unreadable-%s.txt" % serve_path)
    with open(listed, "w") as f:
        f.write("# sectors to fail\n" + UNREADABLE.replace(", ", "\n") + "  # the last\n")
    slot = 1 if serve_path == "helper" else 2
    pid, log, path = serve_with_unreadable_sectors(
        served, serve_path, slot, ["--fault-bad", UNREADABLE if serve_path == "helper"
                                   else "@" + listed, "--fault-bad-error", error], 4 << 20)
    device, bad = "e6.%d" % slot, aoe.SectorSet.parse(UNREADABLE)
    err = aoe.BAD_SECTOR_ERRORS[error]
    with open(path, "rb") as f:
        content = f.read()
    assert served.aoe("read", device, "/dev/null").returncode != aoe.EXIT_OK
    finished, data = engine_requests(served, device, [["read", lba, 1] for lba in range(8192)])
    status = dict(finished)
    assert sorted(status) == list(range(8192))
    assert {status[lba] for lba in range(8192) if lba in bad} == {-(aoe.STATUS_ATA_ERROR | err)}
    assert aoe.status_text(status[0]) == "ATA error: " + aoe.ATA_ERROR_NAMES[err]
    wrong = [lba for lba in range(8192) if lba not in bad and
             (status[lba] or data[lba * 512:(lba + 1) * 512] != content[lba * 512:(lba + 1) * 512])]
    assert not wrong, (len(wrong), wrong[:10])

    me, them = aoe.parse_mac(served.mac("ini")), aoe.parse_mac(served.mac("tgt"))
    scnt = aoe.frame_sectors(served.mtu)
    requests = [aoe.pack_ata(them, me, 6, slot, 0x5000 + k,
                             aoe.AtaFields(aoe.AOEAFL_EXT, 0, scnt, aoe.ATA_CMD_PIO_READ_EXT,
                                           3000 - k))
                for k in range(scnt)]
    for k, answer in enumerate(wire_answers(served, requests)):
        assert answer is not None, k
        a = aoe.parse_ata(aoe.parse_frame(answer))
        assert (a.cmd_status, a.err_feature, a.count, a.lba) == \
            (aoe.ATA_DRDY | aoe.ATA_ERR, err, scnt - k, 3000 - k)
        assert len(answer) == max(aoe.ETH_ZLEN, aoe.ATA_HDR_LEN + k * 512), k
        assert bytes(a.data[:k * 512]) == content[(3000 - k) * 512:3000 * 512], k
    stats = stop_serve(pid, log)
    assert stats["unreadable"] >= len(bad) + scnt, stats
    if serve_path == "helper":
        # the good sectors' READs are answered in C, but those after an unreadable one in the
        # same received batch go to Python with it (how many depends on batching: the load)
        assert stats["fast_path"] >= (8192 - len(bad)) * 3 // 4, stats
    else:
        assert "fast_path" not in stats, stats


def mapped(path, status):
    """The sectors a mapfile gives `status`, as a SectorSet (ddrescuelog -l does the same)."""
    with open(path) as f:
        rmap = aoe.RescueMap.parse(f.read(), path, 1 << 40)
    return aoe.SectorSet((pos // 512, (pos + length) // 512)
                         for pos, length, _ in rmap.areas(status))


@pytest.mark.net
@pytest.mark.parametrize("serve_path, initiator", [("helper", "helper"), ("python", "python")])
def test_rescue_through_serve_with_unreadable_sectors(served, serve_path, initiator):
    """rescue against serve --fault-bad: the image equals the export outside the unreadable
    set, the map's bad sectors are exactly that set, GNU ddrescuelog reads the map with the
    same totals; and a map GNU ddrescue wrote (its first MiB copied) is taken up and finished
    to the same image and bad set."""
    need(shutil.which("ddrescue") and shutil.which("ddrescuelog"),
         "needs GNU ddrescue (Debian's gddrescue)")
    slot = 3 if serve_path == "helper" else 4
    rng = random.Random(slot * served.mtu)
    unreadable = UNREADABLE + "".join(", %d" % rng.randrange(8192) for _ in range(30))
    pid, log, path = serve_with_unreadable_sectors(served, serve_path, slot,
                                                   ["--fault-bad", unreadable], 4 << 20)
    device, bad = "e6.%d" % slot, aoe.SectorSet.parse(unreadable)
    with open(path, "rb") as f:
        content = f.read()
    tmp, extra = str(served.tmp), ["--no-helper"] if initiator == "python" else []
    image, mapfile = os.path.join(tmp, "rescued-%d.img" % slot), os.path.join(tmp, "r%d.map" % slot)
    r = served.aoe("rescue", device, image, mapfile, "--json", *extra)
    assert r.returncode == aoe.EXIT_FAIL, r.stderr                 # bad sectors remain
    report = json.loads(r.stdout)
    assert (report["bad"], report["rescued"], report["finished"]) == \
        (len(bad) * 512, (8192 - len(bad)) * 512, True)
    assert mapped(mapfile, "-") == bad and len(mapped(mapfile, "+")) == 8192 - len(bad)
    with open(image, "rb") as f:
        got = f.read()
    assert len(got) == len(content)
    assert all(got[lba * 512:(lba + 1) * 512] == content[lba * 512:(lba + 1) * 512]
               for lba in range(8192) if lba not in bad)
    shown = subprocess.run(["ddrescuelog", "-t", mapfile], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    listed = subprocess.run(["ddrescuelog", "-l-", mapfile], capture_output=True, text=True)
    assert set(map(int, listed.stdout.split())) == set(lba for lba in range(8192) if lba in bad)
    # GNU ddrescue copies the first MiB of the export's file; rescue takes its map up
    image2, map2 = image + ".2", mapfile + ".2"
    copied = subprocess.run(["ddrescue", "-s", str(1 << 20), path, image2, map2],
                            capture_output=True, text=True)
    assert copied.returncode == 0, copied.stderr
    assert mapped(map2, "+") == aoe.SectorSet([(0, 2048)])
    r = served.aoe("rescue", device, image2, map2, "--json", *extra)
    assert r.returncode == aoe.EXIT_FAIL, r.stderr
    assert json.loads(r.stdout)["read"] < len(content) - (1 << 20)     # not read again
    assert mapped(map2, "-") == aoe.SectorSet((max(a, 2048), e) for a, e in bad if e > 2048)
    with open(image2, "rb") as f:
        assert f.read()[2048 * 512:] == got[2048 * 512:]
    stop_serve(pid, log)


@pytest.mark.net
def test_rescue_waits_for_slow_bad_sectors_without_giving_up_the_target(served):
    """Bad sectors answered only after 1 s, as a disk retrying them answers: rescue (deadsecs
    5) waits for them while the rest goes on, never takes the target for dead, and ends with
    exactly those sectors bad; the whole run takes a few of those seconds, not one a read."""
    slot = 5
    pid, log, path = serve_with_unreadable_sectors(
        served, "helper", slot, ["--fault-bad", "100,3000+17,6000", "--fault-bad-delay", "1000"],
        4 << 20)
    image, mapfile = (os.path.join(str(served.tmp), name) for name in ("slow.img", "slow.map"))
    started = time.monotonic()
    r = served.aoe("rescue", "e6.%d" % slot, image, mapfile, "--json", "--deadsecs", "5")
    took = time.monotonic() - started
    assert r.returncode == aoe.EXIT_FAIL and "deadsecs" not in r.stderr, r.stderr
    assert mapped(mapfile, "-") == aoe.SectorSet.parse("100,3000+17,6000")
    assert json.loads(r.stdout)["rescued"] == (8192 - 19) * 512
    # three bad areas, each read in copying, trimming and scraping: a dozen slow answers at
    # most, most of them waited for together
    assert took < 12, took
    stop_serve(pid, log)


@pytest.mark.net
@pytest.mark.parametrize("serve_path", ["helper", "python"])
def test_serve_fault_bad_delay_holds_up_only_the_unreadable(served, serve_path):
    """With --fault-bad-delay 1000 a READ of unreadable sectors is answered a second late,
    and what comes after it first: a READ of a good sector, WRITEs (one to an unreadable
    sector: it succeeds and the sector stays unreadable); another unreadable READ is held
    on its own.  Only the order counts, not times."""
    slot = 3 if serve_path == "helper" else 4
    pid, log, path = serve_with_unreadable_sectors(
        served, serve_path, slot, ["--fault-bad", "10, 20", "--fault-bad-delay", "1000"], 1 << 20)
    device = "e6.%d" % slot
    finished, _ = engine_requests(served, device, [["read", 10, 1], ["read", 11, 1],
                                                   ["write", 20, 1], ["write", 30, 1],
                                                   ["read", 8, 3]])
    aborted = -(aoe.STATUS_ATA_ERROR | aoe.ATA_ABORTED)
    assert sorted(i for i, _ in finished[:3]) == [1, 2, 3] and \
        sorted(finished[3:]) == [[0, aborted], [4, aborted]], finished
    assert all(status == 0 for _, status in finished[:3]), finished
    finished, data = engine_requests(served, device, [["read", 20, 1], ["read", 30, 1]])
    assert sorted(finished) == [[0, aborted], [1, 0]] and data[512:] == b"\xa5" * 512
    with open(path, "rb") as f:
        assert f.read()[20 * 512:21 * 512] == b"\xa5" * 512
    assert stop_serve(pid, log)["unreadable"] >= 3


def drop_counts(stderr):
    """The counts on the 'dropped: ...' line aoe.py -v prints."""
    line = stderr.split("dropped: ", 1)[1].splitlines()[0]
    return ({} if line == "none"
            else {k: int(v) for k, v in (item.rsplit(" ", 1) for item in line.split(", "))})


def window_cuts(stderr):
    """(cuts, undone) of every path, from aoe.py -v."""
    return [tuple(map(int, re.search(r"window cut (\d+) times \((\d+) undone\)", line).groups()))
            for line in stderr.splitlines() if line.startswith("path ")]


@pytest.mark.net
def test_hostile_target_never_gets_wrong_data_in(served, data_path):
    """Before every true READ answer, serve --fault-forge sends three forged ones (a tag
    bit flipped, another LBA's data under the right tag, a wrong count or command echo,
    cut short, from another MAC or shelf, not a response, a random tag) and replays an
    old answer: read returns the exact bytes, and each kind was dropped and counted."""
    slot = "7" if data_path else "8"
    path = make_file(os.path.join(str(served.tmp), "hostile" + slot), 6 << 20, 6 << 20)
    served.start(served.tgt_ns,
                 [sys.executable, AOE_PY, "serve", "--fault-forge", "1", "--fault-seed", "3",
                  "2", slot, served.tgt_if, path], ready="pid ")
    out = path + ".img"
    r = served.aoe("read", "e2." + slot, out, "-v", env=data_path)
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as a, open(path, "rb") as b:
        assert a.read() == b.read()
    drops = drop_counts(r.stderr)
    for reason in ("bad_tag", "stale", "bad_mac", "short", "echo", "foreign", "not_response"):
        assert drops.get(reason, 0) > 50, (reason, r.stderr)


STALLING_READER = r"""
import hashlib, sys, time
digest, seen = hashlib.sha256(), 0
for block in iter(lambda: sys.stdin.buffer.read(1 << 16), b""):
    digest.update(block)
    seen += len(block)
    if seen % (2 << 20) < len(block):
        time.sleep(0.1)                       # a slow disk, a busy machine
print(digest.hexdigest())
"""


@pytest.mark.net
def test_stalling_consumer_causes_no_window_cut(served, data_path):
    """A consumer that stalls now and then, answers delayed by 1 ms with half a
    millisecond of jitter: the read is exact, and no cut of the window stands."""
    slot = "9" if data_path else "10"
    path = make_file(os.path.join(str(served.tmp), "jitter" + slot), 24 << 20, 24 << 20)
    served.start(served.tgt_ns,
                 [sys.executable, AOE_PY, "serve", "--fault-delay", "1", "--fault-jitter", "0.5",
                  "2", slot, served.tgt_if, path], ready="pid ")
    reader = " ".join(shlex.quote(w)
                      for w in served.aoe_argv(served.ini_ns, ["read", "e2." + slot, "-", "-v"]))
    consumer = " ".join(shlex.quote(w) for w in [sys.executable, "-c", STALLING_READER])
    r = subprocess.run(["bash", "-c", "set -o pipefail; %s | %s" % (reader, consumer)],
                       capture_output=True, text=True, env=dict(served.env(), **data_path),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    with open(path, "rb") as f:
        assert r.stdout.strip() == hashlib.sha256(f.read()).hexdigest()
    cuts = window_cuts(r.stderr)
    assert cuts and all(made == undone for made, undone in cuts), r.stderr


def slow_target_read(served, name, shelf_slot, deadsecs):
    """Start a long read from a target whose answers are slowed down; returns (read process,
    target, paths)."""
    path = make_file(os.path.join(str(served.tmp), name), 64 << 20, 64 << 20)
    target = served.start(served.tgt_ns, [sys.executable, AOE_PY, "serve", "--fault-delay", "20"]
                          + shelf_slot + [served.tgt_if, path], ready="pid ")
    out = os.path.join(str(served.tmp), name + ".img")
    reader = subprocess.Popen(served.aoe_argv(served.ini_ns,
                                              ["read", "e%s.%s" % tuple(shelf_slot), out,
                                               "--deadsecs", str(deadsecs)]),
                              env=served.env(), stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    assert reader.poll() is None, reader.stderr.read()
    return reader, target, path, out


@pytest.mark.net
def test_dead_target_fails_within_deadsecs(served):
    reader, target, _, _ = slow_target_read(served, "dead", ["2", "4"], deadsecs=3)
    try:
        target.terminate()                 # timeout(1) passes it on to serve
        t0 = time.monotonic()
        _, err = reader.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        reader.kill()
    assert reader.returncode == 1 and "no answer for 3 s (deadsecs)" in err, err
    assert 2.5 < waited < 3 + 5


@pytest.mark.net
def test_target_back_within_deadsecs_completes_the_read(served):
    reader, target, path, out = slow_target_read(served, "back", ["2", "5"], deadsecs=60)
    try:
        target.terminate()
        target.wait()
        time.sleep(2)
        served.start(served.tgt_ns,
                     [sys.executable, AOE_PY, "serve", "2", "5", served.tgt_if, path], ready="pid ")
        _, err = reader.communicate(timeout=120)
    finally:
        reader.kill()
    assert reader.returncode == 0, err
    with open(out, "rb") as a, open(path, "rb") as b:
        assert a.read() == b.read()


@pytest.mark.net
def test_demo_runs_and_cleans_up():
    need(os.geteuid() == 0, "demo needs root")
    def demo_namespaces():
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if line.startswith("aoedemo")]
    before = demo_namespaces()
    r = subprocess.run([sys.executable, AOE_PY, "demo", "--mtu", "1500"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "read-back matches" in r.stdout and "e0.1" in r.stdout
    assert demo_namespaces() == before


@pytest.mark.codec
def test_aoe_py_uses_only_the_standard_library():
    import ast
    tree = ast.parse(open(AOE_PY).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    assert {name for name in names if not in_standard_library(name)} == {"_aoeio"}


@pytest.mark.net
def test_sancheck_names_the_mtu_to_set(tmp_path):
    """Target side at MTU 9000 advertises 17 sectors; our side at 1500 cannot carry them."""
    bench = Bench(1500, tmp_path)
    try:
        bench.ip("-n", bench.tgt_ns, "link", "set", bench.tgt_if, "mtu", "9000")
        bench.vblade(0, 1, make_file(tmp_path / "d", 1 << 20))
        r = bench.aoe("sancheck")
        assert r.returncode == 1
        assert "%s: MTU 1500 but e0.1 needs 8726 for 17-sector frames" % bench.ini_if in r.stdout
        report = json.loads(bench.aoe("sancheck", "--json").stdout)
        assert report[0]["paths"][0]["path_sectors"] == 2 and report[0]["payload"] == 1024
        out = tmp_path / "img"
        # still works at 2 sectors a frame
        assert bench.aoe("read", "e0.1", str(out)).returncode == 0
        assert out.read_bytes() == (tmp_path / "d").read_bytes()
    finally:
        bench.close()


@pytest.mark.net
def test_two_paths_are_used_together_and_fail_over(tmp_path):
    """One export behind two target ports (two serve processes, two veth pairs):
    reads use both paths; when one port goes silent the read completes on the other."""
    bench = Bench(1500, tmp_path)
    try:
        _, tgt_if2 = bench.add_link()
        path = make_file(tmp_path / "d", 32 << 20, 32 << 20)
        # 8 buffers per port and every answer 2 ms late: about 4 MB/s per path, so the
        # read is still going when the first 4 MiB have arrived and one port goes silent.
        for ifname in (bench.tgt_if, tgt_if2):
            bench.start(bench.tgt_ns,
                        [sys.executable, AOE_PY, "serve", "-b", "8", "--fault-delay", "2", "4", "4",
                         ifname, path], ready="pid ")
        rows = bench.aoe_json("stat")
        assert len(rows) == 1 and len(rows[0]["paths"]) == 2
        out = tmp_path / "img"
        reader = subprocess.Popen(bench.aoe_argv(bench.ini_ns, ["read", "e4.4", str(out), "-v",
                                                                "--deadsecs", "30"]),
                                  env=bench.env(), stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and reader.poll() is None and (
                not out.exists() or out.stat().st_size < 4 << 20):
            time.sleep(0.05)
        assert reader.poll() is None and out.stat().st_size < 16 << 20
        bench.ip("-n", bench.tgt_ns, "link", "set", tgt_if2, "down")
        _, err = reader.communicate(timeout=240)
        assert reader.returncode == 0, err
        assert out.read_bytes() == (tmp_path / "d").read_bytes()
        answered = [int(line.split("answered ")[1].split(",")[0]) for line in err.splitlines()
                    if line.startswith("path ")]
        assert len(answered) == 2 and min(answered) > 100, err
        assert "set aside" in err, err
    finally:
        bench.close()


FORGE = r"""
import socket, sys, time
# Answer every data request seen on the target side at once, before the real
# target: from a wrong MAC with the exact tag, and with a wrong shelf; all with junk data.
ifname = sys.argv[1]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88A2))
s.bind((ifname, 0x88A2))
s.settimeout(0.2)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        f = s.recv(65536)
    except socket.timeout:
        continue
    if len(f) < 36 or f[14] & 0x08 or f[19] != 0 or f[27] not in (0x20, 0x24):
        continue
    n = f[26] * 512
    body = bytes([0x18, 0]) + f[16:20] + f[20:24] + f[24:26] + bytes([0, 0x40]) + f[28:36] + b'\xee' * n
    s.send(f[6:12] + bytes.fromhex('02deadbeef01') + b'\x88\xa2' + body)           # wrong MAC
    s.send(f[6:12] + f[0:6] + b'\x88\xa2' + bytes([0x18, 0]) + ((int.from_bytes(f[16:18], 'big') + 1) % 65535).to_bytes(2, 'big')
           + f[18:20] + f[20:24] + f[24:26] + bytes([0, 0x40]) + f[28:36] + b'\xee' * n)   # other shelf
"""


@pytest.mark.net
def test_forged_answers_cannot_change_data(vblades, data_path):
    forger = vblades.start(vblades.tgt_ns, [sys.executable, "-c", FORGE, vblades.tgt_if, "60"])
    try:
        time.sleep(0.3)
        out = os.path.join(str(vblades.tmp), "forged%d" % vblades.mtu)
        r = vblades.aoe("read", "e0.1", out, "--length", "16M", "-v", env=data_path)
        assert r.returncode == 0, r.stderr
        with open(out, "rb") as a, open(vblades.files["e0.1"], "rb") as b:
            assert a.read() == b.read(16 << 20)
        drops = dict(item.rsplit(" ", 1)
                     for item in r.stderr.split("dropped: ", 1)[1].strip().split(", "))
        # A forgery that arrives after the real answer is stale; one before it, from the wrong MAC.
        forged_tag_drops = int(drops.get("bad_mac", 0)) + int(drops.get("stale", 0))
        assert forged_tag_drops > 100 and int(drops.get("foreign", 0)) > 100, r.stderr
    finally:
        forger.terminate()


@pytest.mark.net
def test_read_resume_and_checksum(vblades):
    full = os.path.join(str(vblades.tmp), "full%d" % vblades.mtu)
    r = vblades.aoe("read", "e0.1", full, "--length", "8M", "--checksum", "sha256")
    assert r.returncode == 0, r.stderr
    digest = r.stdout.split()[0]
    part = os.path.join(str(vblades.tmp), "part%d" % vblades.mtu)
    with open(part, "wb") as f, open(full, "rb") as g:
        f.write(g.read((3 << 20) + 700))               # an interrupted image, not sector aligned
    r = vblades.aoe("read", "e0.1", part, "--length", "8M", "--resume", "--checksum", "sha256")
    assert r.returncode == 0 and "resuming" in r.stderr and \
        "at byte %d" % (3 << 20 | 512) in r.stderr
    assert r.stdout.split()[0] == digest
    with open(part, "rb") as a, open(full, "rb") as b:
        assert a.read() == b.read()


@pytest.mark.net
def test_commands_under_the_oldest_python(vblades, data_path, oldest_python, tmp_path):
    """Python 3.6 runs aoe.py from a copy of the checkout with its own helper (or without it):
    discover, stat --json, read with a checksum and write against vblade, and serve -d
    (O_DIRECT: its aligned buffer read and written in place) read and written by the same."""
    python, checkout = oldest_python
    old = (python, os.path.join(checkout, "aoe.py"))
    found = vblades.aoe_json("discover", python=old)
    assert [(d["device"], d["config"]) for d in found] == \
        [("e0.1", ""), ("e0.2", ""), ("e3.7", CONFIG_37)]
    rows = {d["device"]: d for d in vblades.aoe_json("stat", python=old)}
    assert {name: (d["size_bytes"], d["state"]) for name, d in rows.items()} == \
        {name: (os.path.getsize(path), aoe.STATE_UP) for name, path in vblades.files.items()}
    image = tmp_path / "image"
    r = vblades.aoe("read", "e0.1", str(image), "--length", "8M", "--checksum", "sha256",
                    env=data_path, python=old)
    with open(vblades.files["e0.1"], "rb") as f:
        expected = f.read(8 << 20)
    assert r.returncode == 0, r.stderr
    assert ("pure Python)" if data_path else "helper)") in r.stderr, r.stderr
    assert r.stdout.split() == [hashlib.sha256(expected).hexdigest(), "e0.1"]
    assert image.read_bytes() == expected
    data = os.urandom(1 << 20)
    (tmp_path / "data").write_bytes(data)
    r = vblades.aoe("write", "--yes", "--offset", "40M", str(tmp_path / "data"), "e0.1",
                    env=data_path, python=old)
    assert r.returncode == 0, r.stderr
    with open(vblades.files["e0.1"], "rb") as f:
        f.seek(40 << 20)
        assert f.read(1 << 20) == data
    export = make_file(tmp_path / "export", 8 << 20, 8 << 20)
    with open(export, "rb") as f:
        original = f.read()
    serve = vblades.start(vblades.tgt_ns, ["env"] + ["%s=%s" % kv for kv in data_path.items()]
                          + list(old) + ["serve", "-d", "6", "1", vblades.tgt_if, export],
                          ready="pid ")
    try:
        r = vblades.aoe("read", "e6.1", "-", binary=True, env=data_path, python=old)
        assert r.returncode == 0 and r.stdout == original, r.stderr
        r = vblades.aoe("write", "--yes", "--offset", "3M", str(tmp_path / "data"), "e6.1",
                        env=data_path, python=old)
        assert r.returncode == 0, r.stderr
        with open(export, "rb") as f:
            assert f.read() == original[:3 << 20] + data + original[4 << 20:]
    finally:
        serve.terminate()
        serve.wait(10)


PEAK_MEMORY = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "sys.stderr.write('peak rss %d KiB\\n' % "
               "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


@pytest.mark.net
def test_one_gib_image_byte_for_byte(vblades, data_path):
    """A whole 1 GiB export of random data read with each data path, compared with
    cmp; the reader's memory stays flat (well under a tenth of the image)."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else str(vblades.tmp)
    src = os.path.join(shm, "aoe-test-%s.img" % vblades.tag)
    out = src + ".out"
    try:
        with open(src, "wb") as f:
            for _ in range(1024):
                f.write(os.urandom(1 << 20))
        slot = "8" if data_path else "9"
        vblade = vblades.vblade(5, slot, src)
        r = subprocess.run(vblades.argv(vblades.ini_ns,
                                        [sys.executable, "-c", PEAK_MEMORY, sys.executable, AOE_PY,
                                         "read", "e5." + slot, out]),
                           env=dict(vblades.env(), **data_path), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        assert subprocess.run(["cmp", src, out]).returncode == 0
        peak_kib = int(r.stderr.split("peak rss ")[1].split()[0])
        assert peak_kib < 100 << 10, r.stderr
        vblade.terminate()
    finally:
        for path in (src, out):
            if os.path.exists(path):
                os.unlink(path)


class DatagramPort:
    """One end of a socketpair standing in for an interface's socket."""

    def __init__(self, sock):
        self.sock, self.name = sock, "socketpair"

    def fileno(self):
        return self.sock.fileno()

    def send(self, frame):
        self.sock.send(frame)


def random_request(rng, scnt, target_mac, initiators):
    """Mostly well-formed ATA requests, with every field sometimes wrong."""
    shelf = rng.choice([3, 3, 3, 0xFFFF, 4])
    slot = rng.choice([7, 7, 7, 0xFF, 8])
    verfl = rng.choice([0x10] * 8 + [0x18, 0x20, 0x14])
    cmd = rng.choice([0] * 10 + [1, 2, 3, 9])
    head = (rng.choice([target_mac, b"\xff" * 6]) + rng.choice(initiators) + b"\x88\xa2"
            + bytes([verfl, 0]) + shelf.to_bytes(2, "big") + bytes([slot, cmd])
            + rng.getrandbits(32).to_bytes(4, "big"))
    ata_cmd = rng.choice([0x20, 0x24, 0x30, 0x34] * 4 + [0xEC, 0xE7, 0x99])
    count = rng.choice([0, 1, scnt, scnt, scnt + 1, 255])
    lba = rng.choice([0, 1, 1999, 2000, rng.randrange(2100), rng.getrandbits(48), (1 << 28) + 5])
    body = (bytes([rng.choice([0, 0x40, 0x41, 0x01]), 0, count, ata_cmd])
            + lba.to_bytes(8, "little")[:6] + b"\0\0")
    if ata_cmd in (0x30, 0x34):                     # never more than a 1500-byte MTU carries
        body += os.urandom(min(1478 - 12,
                               count * 512 if rng.random() < 0.8
                               else rng.randrange(count * 512 + 1)))
    frame = head + body
    if rng.random() < 0.05:
        frame = frame[:rng.randrange(len(frame))]
    return frame + bytes(max(0, 60 - len(frame))) if rng.random() < 0.7 else frame


@pytest.mark.codec
def test_serve_warns_when_its_sockets_cannot_hold_the_buffer_count(capsys):
    """A small receive buffer (unprivileged caps) cannot keep the -b promise: serve says so."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        ports = [types.SimpleNamespace(sock=ours)]
        ifc = types.SimpleNamespace(name="eth9", mtu=9000)
        aoe.warn_if_buffers_overflow(ports, ifc, 4)
        assert capsys.readouterr().err == ""
        aoe.warn_if_buffers_overflow(ports, ifc, 64)
        err = capsys.readouterr().err
        assert err.startswith("serve: eth9: the receive buffer holds about 7 frames of 9014 "
                              "bytes") and "-b 7" in err


@pytest.mark.codec
def test_sector_set_parses_merges_and_finds_the_first_in_a_range(tmp_path):
    s = aoe.SectorSet.parse("9, 0x10-0x13,3+2, 4 ,20+1,21-0X16")
    assert list(s) == [(3, 5), (9, 10), (16, 23)] and len(s) == 10
    assert s == aoe.SectorSet([(20, 23), (3, 4), (16, 20), (9, 10), (4, 5), (7, 7)])
    assert s != aoe.SectorSet([(3, 5), (9, 10), (16, 22)])
    assert [s.touches(lba, n) for lba, n in ((0, 3), (0, 4), (5, 4), (5, 5), (10, 6), (22, 1),
                                             (23, 99), (4, 0))] == \
        [False, True, False, True, False, True, False, False]
    assert [s.first_in(lba, n) for lba, n in ((0, 99), (4, 9), (10, 9), (10, 6), (4, 0))] == \
        [3, 4, 16, None, None]
    assert 9 in s and 10 not in s
    rng = random.Random(3)                   # against a plain set of sector numbers
    for _ in range(200):
        ranges = [(a, a + rng.randrange(4)) for a in (rng.randrange(60) for _ in range(5))]
        s, plain = aoe.SectorSet(ranges), {x for a, b in ranges for x in range(a, b)}
        assert len(s) == len(plain) and {x for a, b in s for x in range(a, b)} == plain
        assert all(b1 < a2 for (_, b1), (a2, _) in zip(list(s), list(s)[1:]))   # merged
        for lba, n in ((rng.randrange(70), rng.randrange(6)) for _ in range(20)):
            inside = sorted(plain & set(range(lba, lba + n)))
            assert s.first_in(lba, n) == (inside[0] if inside else None)
            assert s.touches(lba, n) == bool(inside)
    listed = tmp_path / "bad.txt"
    listed.write_text("# unreadable\n0x100+8   # one 4 KiB block\n7,\n\n  300-301 1\n")
    assert list(aoe.sector_set_arg("@%s" % listed)) == [(1, 2), (7, 8), (256, 264), (300, 302)]


@pytest.mark.codec
@pytest.mark.parametrize("value, said", [
    ("9-3", "'9-3' ends before it starts"),
    ("4+0", "'4+0' has no sectors"),
    ("1,x", "'x' is not N, A-B or A+N"),
    ("010x", "'010x' is not N, A-B or A+N"),
    (" , ", "no sectors given"),
    ("@/nonexistent/bad.txt", "@/nonexistent/bad.txt: No such file or directory"),
    ("8", "sector 8 is past the end of the export (8 sectors)")])
def test_serve_fault_bad_refuses_bad_ranges_in_one_line(value, said, capsys, tmp_path):
    export = make_file(tmp_path / "eight", 8 * 512)
    assert aoe.main(["serve", "--fault-bad", value, "1", "1", "lo", export]) == aoe.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--fault-bad" in err and said in err and len(err.splitlines()) == 1, err


def read_touching(frame, sectors):
    """Whether a frame is an ATA READ of sectors that touch `sectors` (a SectorSet)."""
    try:
        f = aoe.parse_frame(frame)
        a = aoe.parse_ata(f)
    except aoe.FrameError:
        return False
    if f.command != aoe.AOECMD_ATA or \
            a.cmd_status not in (aoe.ATA_CMD_PIO_READ, aoe.ATA_CMD_PIO_READ_EXT):
        return False
    lba = a.lba if a.cmd_status == aoe.ATA_CMD_PIO_READ_EXT else a.lba & aoe.LBA28_MAX
    return sectors.touches(lba, a.count)


def received(sock):
    try:
        return sock.recv(70000, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None


@pytest.mark.codec
@pytest.mark.parametrize("readonly,bad", [(False, None), (True, None),
                                          (False, "0, 5, 64-79, 700+600, 1999")],
                         ids=["rw", "ro", "bad"])
def test_serve_fast_path_answers_exactly_like_python(tmp_path, readonly, bad):
    """Frame by frame, the C fast path's answers (or silence) equal AoeTarget.handle's,
    including after mask and reservation edits handed to Python.  With unreadable sectors
    (serve --fault-bad, sector 5 also reached by LBA28 requests past 2^28), the READs
    that touch them are handed to Python, and only those: a second struct aoe_srv without
    them hands over exactly the other frames."""
    helper = aoe.load_helper()
    need(helper is not None, "needs the compiled helper: python3 build_ffi.py")
    rng = random.Random(5)
    mac = bytes.fromhex("020000000001")
    initiators = [bytes.fromhex("02000000000%d" % i) for i in range(2, 5)]
    image = make_file(tmp_path / "img", 1 << 20, 1 << 20)
    unreadable = aoe.BadSectors(aoe.SectorSet.parse(bad)) if bad else None
    fast_side, twin = [aoe.AoeTarget(3, 7, aoe.Export(image, readonly, offset=8, length=2000),
                                     mac, 1500, bad=unreadable) for _ in range(2)]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    plain_ours, plain_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    port = DatagramPort(ours)
    fast = aoe.FastServe(helper, fast_side, [port, DatagramPort(plain_ours)], 1514)
    srv, plain = fast.srvs              # plain: the same lists (mirrored), no unreadable sectors
    assert helper.lib.aoe_srv_set_bad(plain, helper.ffi.NULL, helper.ffi.NULL, 0) == 0
    edits = [aoe.pack_reserve(mac, initiators[0], 3, 7, 1,
                              aoe.ReserveInfo(aoe.RCMD_FORCE, [initiators[1]])),
             aoe.pack_mask(mac, initiators[0], 3, 7, 2,
                           aoe.MaskInfo(aoe.MCMD_EDIT, 0, [(aoe.DCMD_ADD, initiators[1])]))]
    answered = handed_for_bad = 0
    for i in range(3000):
        frame = (edits[i // 1000 - 1] if i % 1000 == 0 and i
                 else random_request(rng, fast_side.scnt, mac, initiators))
        theirs.send(frame)
        plain_theirs.send(frame)
        n = helper.lib.aoe_srv_pump(srv, 0)
        plain_n = helper.lib.aoe_srv_pump(plain, 0)      # writes the same bytes again
        assert n >= 0 and plain_n >= 0
        if n:
            fast.answer_slow(srv, port, n)
        reply, plain_fast = received(theirs), received(plain_theirs) is not None
        expect = twin.handle(frame)
        assert reply == expect, (frame[:40].hex(), (reply or b"")[:40].hex(),
                                 (expect or b"")[:40].hex())
        for_bad = plain_fast and bool(unreadable) and read_touching(frame, unreadable.sectors)
        assert bool(n) == (bool(plain_n) or for_bad), frame[:40].hex()
        answered += reply is not None
        handed_for_bad += for_bad
    assert answered > 500 and srv.c.drop_masked > 0
    if bad:       # more handed over than failed: READs past the end are answered IDNF
        assert handed_for_bad >= fast_side.stats["unreadable"] == twin.stats["unreadable"] > 25
    else:
        assert handed_for_bad == 0


@pytest.mark.codec
@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_serve_fast_path_executes_ata_like_python(tmp_path, readonly):
    """Below the AoE framing, command by command: what the helper's fast path executes
    itself (aoe_srv_ata) ends with AtaDisk's status, error and count and the same data;
    it hands to aoe.py exactly the commands AtaDisk refuses, those other than READ/WRITE
    and the READs touching an unreadable sector.  LBAs at the export's edges, LBA28
    commands past 2^28 (they wrap) and LBA48 ones (they do not); last, the file cut short
    under the export (UNC)."""
    helper = aoe.load_helper()
    need(helper is not None, "needs the compiled helper: python3 build_ffi.py")
    sectors, ffi, lib = 2000, helper.ffi, helper.lib
    image = make_file(tmp_path / "img", 1 << 20, 1 << 20)
    bad = aoe.BadSectors(aoe.SectorSet.parse("0, 5, 64-79, 1999"))
    target = aoe.AoeTarget(3, 7, aoe.Export(image, readonly, offset=8, length=sectors),
                           bytes.fromhex("020000000001"), 1500, bad=bad)
    disk, scnt = target.disk, target.scnt
    transfers = aoe.ATA_READS + aoe.ATA_WRITES
    seen = collections.Counter()

    def compare(cmd, lba, count, data=b""):
        expect = disk.execute(aoe.AtaCommand(cmd, lba, count, 0, data))
        registers = ffi.new("struct aoe_srv_ata *", {"cmd": cmd, "lba": lba, "count": count})
        room = len(data) if cmd in aoe.ATA_WRITES else count * 512
        buf = ffi.new("uint8_t[]", max(1, room))
        ffi.memmove(buf, data, len(data))
        handed = lib.aoe_srv_ata(srv, registers, buf, room)
        lba48 = cmd in (aoe.ATA_CMD_PIO_READ_EXT, aoe.ATA_CMD_PIO_WRITE_EXT)
        sector = lba if lba48 else lba & aoe.LBA28_MAX
        refused = (expect is None or cmd not in transfers
                   or (cmd in aoe.ATA_READS and bad.sectors.touches(sector, count)))
        where = (hex(cmd), hex(lba), count, len(data), expect)
        assert handed == refused, where
        if handed:
            seen["handed"] += 1
            return
        got = (registers.status, registers.err, registers.left)
        assert got == (expect.status, expect.error, expect.count) and not expect.delay, where
        if cmd in aoe.ATA_READS and not expect.status & aoe.ATA_ERR:
            assert ffi.buffer(buf, room)[:] == expect.data, where
        seen[expect.error] += 1

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        srv = aoe.FastServe(helper, target, [DatagramPort(ours)], 1514).srvs[0]
        lbas = [0, 1, 4, 5, 6, 63, 80, 1000, sectors - scnt, sectors - 2, sectors - 1, sectors,
                1 << 28 | 5, (1 << 28) + 1000, (1 << 28) - 1, (1 << 48) - 1]
        others = [aoe.ATA_CMD_ID_ATA, aoe.ATA_CMD_CHK_POWER, aoe.ATA_CMD_FLUSH,
                  aoe.ATA_CMD_FLUSH_EXT, 0x00, 0xB0]
        for cmd in transfers + tuple(others):
            for lba in lbas:
                for count in (0, 1, scnt, scnt + 1, 255):
                    if cmd not in aoe.ATA_WRITES:
                        compare(cmd, lba, count)
                        continue
                    data = os.urandom(count * 512)
                    compare(cmd, lba, count, data)
                    compare(cmd, lba, count, data[:-1])      # short of its data
        os.truncate(image, (8 + 1000) * 512)
        for cmd in aoe.ATA_READS:
            for lba in (998, 999, 1000, 1500):
                compare(cmd, lba, scnt)
    assert seen["handed"] > 300 and seen[0] > 50 and seen[aoe.ATA_IDNF] > 50, seen
    assert seen[aoe.ATA_UNC] == 6 and bool(seen[aoe.ATA_ABORTED]) == readonly, seen
    # what AtaDisk does with the commands the fast path hands over
    results = {cmd: disk.execute(aoe.AtaCommand(cmd, 7, 1))
               for cmd in (aoe.ATA_CMD_ID_ATA, aoe.ATA_CMD_CHK_POWER, aoe.ATA_CMD_FLUSH, 0xB0)}
    assert [(r.status, r.error, r.count, len(r.data)) for r in results.values()] == [
        (aoe.ATA_DRDY, 0, 0, 512), (aoe.ATA_DRDY, 0, 0xFF, 0), (aoe.ATA_DRDY, 0, 0, 0),
        (aoe.ATA_DRDY | aoe.ATA_ERR, aoe.ATA_ABORTED, 1, 0)]
    assert disk.execute(aoe.AtaCommand(aoe.ATA_CMD_ID_ATA, 0, 2)) is None
    failed = disk.execute(aoe.AtaCommand(aoe.ATA_CMD_PIO_READ_EXT, 4, 2))   # stops at 5
    assert (failed.status, failed.error, failed.count, len(failed.data)) == \
        (aoe.ATA_DRDY | aoe.ATA_ERR, aoe.ATA_ABORTED, 1, 512)
    target.export.close()


@pytest.mark.codec
def test_serve_fast_path_batches_like_python(tmp_path):
    """Requests that arrive together are answered as one batch, where runs of
    back-to-back sectors share one preadv/pwritev: the answers still equal
    AoeTarget.handle's one by one (reads see the batch's earlier writes), and when
    the file is cut short under a run, exactly the frames past its end fail (UNC)."""
    helper = aoe.load_helper()
    need(helper is not None, "needs the compiled helper: python3 build_ffi.py")
    mac, me = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
    content = os.urandom(256 * 512)
    targets = []
    for name in ("fast", "twin"):
        (tmp_path / name).write_bytes(content)
        targets.append(aoe.AoeTarget(3, 7, aoe.Export(str(tmp_path / name)), mac, 1500))
    fast_side, twin = targets
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    port = DatagramPort(ours)
    fast = aoe.FastServe(helper, fast_side, [port], 1514)
    srv = fast.srvs[0]
    tags = iter(range(1, 1000))

    def read(lba, count=2):
        return aoe.pack_ata(mac, me, 3, 7, next(tags),
                            aoe.AtaFields(aoe.AOEAFL_EXT, 0, count, aoe.ATA_CMD_PIO_READ_EXT, lba,
                                          b""))

    def write(lba, count=2):
        return aoe.pack_ata(mac, me, 3, 7, next(tags),
                            aoe.AtaFields(aoe.AOEAFL_EXT | aoe.AOEAFL_WRITE, 0, count,
                                          aoe.ATA_CMD_PIO_WRITE_EXT, lba, os.urandom(count * 512)))

    def exchange(batch):
        batches = srv.c.batches
        for frame in batch:
            theirs.send(frame)
        assert helper.lib.aoe_srv_pump(srv, 0) == 0
        assert srv.c.batches == batches + 1              # all in one batch
        replies = [theirs.recv(70000, socket.MSG_DONTWAIT) for _ in batch]
        assert replies == [twin.handle(frame) for frame in batch]
        return [aoe.parse_ata(aoe.parse_frame(r)) for r in replies]

    with ours, theirs:
        answers = exchange([read(0), read(2), read(4), read(6, 1),          # one run of reads
                            # reads of what was just written
                            write(10), write(12), read(10), read(11),
                            # before and after a write
                            read(100), write(100), read(100),
                            # out of order; past the end
                            read(50), read(40), read(254), read(255)])
        assert [a.cmd_status for a in answers] == [aoe.ATA_DRDY] * 14 + [aoe.ATA_DRDY | aoe.ATA_ERR]
        assert answers[0].data[:1024] == content[:1024] and \
            answers[8].data[:1024] == content[100 * 512:102 * 512]
        assert answers[10].data[:1024] != answers[8].data[:1024]
        # the file shrinks under serve
        for path in ("fast", "twin"):
            os.truncate(str(tmp_path / path), 200 * 512 + 256)
        answers = exchange([read(lba) for lba in range(190, 206, 2)])
        assert [a.err_feature for a in answers] == [0] * 5 + [aoe.ATA_UNC] * 3
    assert srv.c.io_errors == 3


FUZZ_FRAMES = int(os.environ.get("AOE_FUZZ_FRAMES", 1000000))   # per data path


class Fuzzer:
    """Random frames for a target e3.7 (every command, random fields, truncations,
    random source MACs), and what a valid write among them may put where."""

    def __init__(self, seed, target_mac, scnt, sectors):
        self.rng = random.Random(seed)
        self.mac, self.scnt, self.sectors = target_mac, scnt, sectors
        # lba -> digests of sectors a valid write carried
        self.allowed = collections.defaultdict(set)
        self.blob = os.urandom(1 << 20)

    def frame(self):
        rng = self.rng
        bits = rng.getrandbits(64)
        dst = (self.mac if bits & 3
               else (b"\xff" * 6 if bits & 4 else rng.getrandbits(48).to_bytes(6, "big")))
        src = MAC_I if bits & 8 else rng.getrandbits(48).to_bytes(6, "big")
        verfl = 0x10 if bits & 0x30 else rng.getrandbits(8)
        shelf = 3 if bits & 0xC0 else rng.choice((0xFFFF, 4, rng.getrandbits(16)))
        slot = 7 if bits & 0x300 else rng.choice((0xFF, 8, rng.getrandbits(8)))
        command = 0 if bits & 0xC00 else rng.choice((1, 2, 3, rng.getrandbits(8)))
        head = (dst + src + b"\x88\xa2" + bytes((verfl, rng.getrandbits(8) if bits & 0x1000 else 0))
                + shelf.to_bytes(2, "big") + bytes((slot, command))
                + rng.getrandbits(32).to_bytes(4, "big"))
        if command == 0:
            ata_cmd = rng.choice((0x20, 0x24, 0x30, 0x34, 0x30, 0x34, 0xEC, 0xE7, 0xEA, 0xE5,
                                  rng.getrandbits(8)))
            count = rng.choice((0, 1, self.scnt, self.scnt, self.scnt + 1, rng.getrandbits(8)))
            lba = rng.choice((rng.randrange(self.sectors), rng.randrange(self.sectors),
                              self.sectors - 1, self.sectors, rng.getrandbits(48),
                              (1 << 28) + rng.randrange(16)))
            aflags = rng.choice((0, 0x40, 0x41, 0x01, rng.getrandbits(8)))
            body = (bytes((aflags, rng.getrandbits(8), count, ata_cmd))
                    + lba.to_bytes(8, "little")[:6] + b"\0\0")
            want = count * 512
            n = want if bits & 0x6000 else rng.randrange(want + 600)
            start = rng.randrange(len(self.blob) - 1500)
            body += self.blob[start:start + min(n, 1478 - 12)]
        else:
            body = self.blob[:0] + rng.getrandbits(8 * 40).to_bytes(40, "big")[:rng.randrange(41)]
        frame = head + body
        if bits & 0x18000 == 0:
            frame = frame[:rng.randrange(len(frame) + 1)]
        if command == 0 and len(frame) >= 36:
            self._note_write(frame)
        return frame + bytes(max(0, 60 - len(frame))) if bits & 0x20000 else frame

    def _note_write(self, f):
        """A write the spec allows (masks and reservations may still refuse it): the
        sectors it may leave behind."""
        if f[14] & 0xF8 != 0x10 or f[16:19] != b"\x00\x03\x07" or f[27] not in (0x30, 0x34):
            return                                        # not a version 1 request to e3.7 to write
        count = f[26]
        # The LBA's width as the E flag says, then as much of it as the command takes.
        raw = f[28:34] if f[24] & 0x40 else f[28:31] + bytes((f[31] & 0x0F,))
        lba = int.from_bytes(raw, "little") & (0xFFFFFFFFFFFF if f[27] == 0x34 else 0x0FFFFFFF)
        if count > self.scnt or len(f) - 36 < count * 512 or lba + count > self.sectors:
            return
        for i in range(count):
            self.allowed[lba + i].add(hashlib.blake2b(f[36 + 512 * i:36 + 512 * (i + 1)],
                                                      digest_size=8).digest())

    def check_export(self, original, now):
        """Every sector that changed holds what some valid write asked for there."""
        changed = 0
        for lba in range(len(now) // 512):
            sector = now[512 * lba:512 * (lba + 1)]
            if sector != original[512 * lba:512 * (lba + 1)]:
                changed += 1
                assert hashlib.blake2b(sector, digest_size=8).digest() in self.allowed[lba], lba
        return changed


def fuzz_target(tmp_path, kind, count):
    """`count` random frames into serve's target (the pure-Python one, or the C fast path with
    Python behind it); returns (target, fuzzer, export before, export after)."""
    mac = bytes.fromhex("020000000001")
    original = os.urandom(2048 * 512)
    (tmp_path / kind).write_bytes(original)
    target = aoe.AoeTarget(3, 7, aoe.Export(str(tmp_path / kind)), mac, 1500)
    fuzzer = Fuzzer(11, mac, target.scnt, target.export.sectors)
    if kind == "python":
        for _ in range(count):
            target.handle(fuzzer.frame())
    else:
        helper = aoe.load_helper()
        need(helper is not None, "needs the compiled helper: python3 build_ffi.py")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        theirs.setblocking(False)
        with ours, theirs:
            port = DatagramPort(ours)
            fast = aoe.FastServe(helper, target, [port], 1514)
            srv = fast.srvs[0]
            for done in range(0, count, 8):
                for _ in range(min(8, count - done)):
                    theirs.send(fuzzer.frame())
                while True:
                    n = helper.lib.aoe_srv_pump(srv, 0)
                    assert n >= 0
                    if n:
                        fast.answer_slow(srv, port, n)
                    try:
                        while True:
                            theirs.recv(70000)
                    except BlockingIOError:
                        pass
                    if not n:
                        break
            assert srv.c.frames_recv == count
            fast._count()
    target.export.close()
    return target, fuzzer, original, (tmp_path / kind).read_bytes()


@pytest.mark.codec
@pytest.mark.parametrize("kind", ["python", "helper"])
def test_serve_survives_fuzzed_frames_and_writes_only_where_asked(tmp_path, kind):
    """A million random frames (AOE_FUZZ_FRAMES) into serve's target: it never fails, answers
    them all or drops and counts them, and the export changes only where a valid write asked."""
    target, fuzzer, before, after = fuzz_target(tmp_path, kind, FUZZ_FRAMES)
    changed = fuzzer.check_export(before, after)
    assert changed > 100                                  # the fuzzer does reach the writes
    assert target.stats["requests"] + sum(target.drops.values()) >= FUZZ_FRAMES
    target.masks, target.reserved = [], []                # whatever the fuzz set, it still serves
    target.export = aoe.Export(str(tmp_path / kind))
    for lba in range(0, 2048, 2):
        ask = aoe.pack_ata(target.mac, MAC_I, 3, 7, lba,
                           aoe.AtaFields(aoe.AOEAFL_EXT, 0, 2, aoe.ATA_CMD_PIO_READ_EXT, lba))
        assert bytes(aoe.parse_ata(aoe.parse_frame(target.handle(ask))).data) == \
            after[512 * lba:512 * (lba + 2)]
    target.export.close()


# -----------------------------------------------------------------------------
# vm: a qemu VM (vm/run) with a kernel that has aoe, ublk and nbd
# -----------------------------------------------------------------------------

VM_RUN = os.path.join(HERE, "vm", "run")
# kernel -> the suite vm/run boots
VM_SUITES = {"6.12": "bookworm-backports", "7.3": "trixie-backports"}
BOTH_KERNELS = pytest.mark.parametrize("kernel", list(VM_SUITES))


KERNEL_TRACE = re.compile(r"\] (-+\[ cut here \]|Oops|BUG:|WARNING:|rcu: INFO:|general protection)")


def first_kernel_trace(console_lines, length=40):
    """The console's first kernel warning or oops, whole (a failure's last lines may not reach
    back to it): the lines from its start, or nothing."""
    for i, line in enumerate(console_lines):
        if KERNEL_TRACE.search(line):
            return ["the kernel's first trace:"] + console_lines[i:i + length] + ["..."]
    return []


def in_vm(script, *args, timeout=1200, python=sys.executable, before="", kernel="6.12",
          again_if=None):
    """Run one of vm/'s scripts inside the VM booted with `kernel` (after the shell words
    `before`); returns its output (asserting it succeeded).  A failure whose output holds
    `again_if` (a fault shown not to be aoe.py's) is reported as a warning and run once more."""
    need(os.geteuid() == 0, "the VM harness needs root")
    need(shutil.which("qemu-system-x86_64") or shutil.which("apt-get"),
         "needs qemu-system-x86 (or apt-get for it)")
    command = before + " ".join([os.path.join("vm", script), python] + [str(a) for a in args])
    for attempt in (1, 2):
        r = subprocess.run([VM_RUN, command], capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, AOE_VM_SUITE=VM_SUITES[kernel]))
        if r.returncode == 0 or not again_if or again_if not in r.stdout or attempt == 2:
            break
        warnings.warn("%s: %s; once more. Its output ended:\n%s"
                      % (script, again_if, r.stdout[-3000:]))
    lines = r.stdout.splitlines()
    steps = [line for line in lines if line.startswith(("== ", "FAIL"))]
    assert r.returncode == 0, "\n".join(["exit %d" % r.returncode] + steps[-4:]
                                        + first_kernel_trace(lines)
                                        + [r.stdout[-3000:], r.stderr[-2000:]])
    # Only the boot that ran the script: vm/run retries boots that die before it (see there).
    return r.stdout.rsplit("vm/run: the VM died before running the command", 1)[-1]


@pytest.mark.vm
@pytest.mark.parametrize("mtu", [1500, 9000])
def test_kernel_aoe_driver_against_serve(mtu):
    """The reference initiator (the kernel's aoe.ko) on aoe.py serve: ext4 and fio verify.  On a
    busy machine the driver has been seen (1 run in about 25) to stall with nothing asked of
    serve: that run counts as the driver's fault, once."""
    out = in_vm("kernel-aoe-vs-serve.sh", mtu, again_if="KERNEL DRIVER STALLED")
    assert "KERNEL-AOE-VS-SERVE OK mtu %d" % mtu in out
    assert "payload %d" % (aoe.frame_sectors(mtu) * 512) in out


@pytest.mark.vm
@BOTH_KERNELS
def test_lossy_link_attach_and_kernel_driver_verify(kernel):
    """netem on the target's side (loss 5%, duplicates 1%, delay 1 ms +- 1 ms, reorder 10%):
    32 MiB of fio 64k random writes with crc32c verify pass through aoe.py attach and through the
    kernel's driver, in one boot against one vblade (their rates are the benchmark's); and
    aoe.py's drop-in aoe-stat prints for its device what aoetools' prints over the driver."""
    out = in_vm("netem-vs-kernel.sh", 9000, "32M", kernel=kernel)
    assert "NETEM OK mtu 9000" in out
    kernel_stat = re.search(r"^aoe-stat, kernel driver: (.*)$", out, re.M).group(1)
    # the same line from both (cmp)
    assert kernel_stat.split()[:2] == ["e0.0", "0.268GB"]
    assert re.search(r"^aoe-stat, aoe.py: +%s$" % re.escape(kernel_stat), out, re.M), out[-2000:]
    for who in ("kernel", "aoe.py"):
        assert re.search(r"^%s: randwrite 64k qd16 [\d.]+ MB/s, verify errors 0$" % re.escape(who),
                         out, re.M), out


@pytest.mark.vm
def test_attach_with_unreadable_sectors():
    """attach through ublk, then nbd (6.12, one boot), on serve --fault-bad: only the requests
    touching the bad sectors fail, the good areas read as the image; a buffered read stops
    exactly at the first bad sector; ublk completes a failed read up to it, so the kernel's I/O
    error names that sector (nbd's the request's start); the device stays up and writable;
    GNU ddrescue -d -b512 on each device and aoe.py rescue map exactly the injected sectors."""
    need(aoe.load_helper() is not None, "needs the compiled helper (python3 build_ffi.py)")
    need(shutil.which("ddrescue") and shutil.which("ddrescuelog"),
         "needs GNU ddrescue (apt-get install gddrescue)")
    out = in_vm("badsector-check.sh", timeout=600)
    assert "BADSECTOR-CHECK OK" in out
    assert re.search(r"^bad sectors: 132 injected, the same 132 found by ddrescue \(ublk, nbd\) "
                     r"and rescue$", out, re.M), out[-3000:]
    assert re.findall(r"^direct: EIO; the kernel's I/O errors at sectors: (\d+) $", out, re.M) \
        == ["10000", "9150"]                                   # ublk's, then nbd's
    print("\n".join(re.findall(r"^(?:\w+: )?(?:ddrescue|rescue) took [\d.]+ s$", out, re.M)))


@pytest.mark.vm
def test_rescue_of_a_failing_disk_beside_gnu_ddrescue():
    """A disk made with device-mapper (dm-error segments: scattered bad sectors, two 64 KiB
    areas) under vblade -d (6.12): aoe.py rescue, and GNU ddrescue -d over aoe.py attach and
    over the kernel's aoe driver, each find exactly the injected bad sectors and image every
    other one with the disk's bytes.  Then sectors that fail only after 2 s (dm-delay): a
    rescue stopped while vblade works off its reads of them, and one started at once, which
    waits for the busy target (not 'no such target') and ends with every bad sector mapped."""
    need(shutil.which("ddrescue") and shutil.which("dmsetup"),
         "needs GNU ddrescue and dmsetup (apt-get install gddrescue dmsetup)")
    out = in_vm("failing-disk-check.sh", timeout=900)
    assert "FAILING-DISK-CHECK OK" in out
    injected = int(re.search(r"^disk: \d+ MiB, (\d+) bad sectors", out, re.M).group(1))
    for who in ("rescue", "attach", "kernel"):
        assert re.search(r"^%s: %d bad sectors, every other one rescued" % (who, injected),
                         out, re.M), out[-3000:]
    assert re.search(r"^slow: %d bad sectors" % (injected + 16), out, re.M), out[-3000:]
    print("\n".join(re.findall(r"^(?:rescue: exit|ddrescue over|first run|second run).*$", out,
                               re.M)))


@pytest.mark.vm
def test_ublk_plumbing_ramdisk():
    """_aoeio's ublk plumbing under ext4 and fio verify, served from RAM; SIGTERM removes the
    device."""
    out = in_vm("ublk-check.sh")
    assert "UBLK-CHECK OK" in out
    # e2fsck -fn clean
    assert "Pass 5: Checking group summary information" in out and "Fix?" not in out
    assert "(last queue error 0)" in out


@pytest.mark.vm
def test_attach_through_nbd_ioctls():
    """nbd's ioctl interface, for kernels without its netlink family: ext4, fio verify, SIGTERM;
    after SIGKILL the device is gone with its daemon, --recover says why not, detach tidies up."""
    out = in_vm("nbd-ioctl-check.sh")
    assert "NBD-IOCTL OK" in out, out[-3000:]
    assert "Oops" not in out and "BUG:" not in out, out[-3000:]


@pytest.mark.vm
@pytest.mark.parametrize("kernel, mtu, backend, alone", [
    ("6.12", 1500, "ublk", False), ("6.12", 9000, "nbd", True), ("7.3", 9000, "ublk", False),
    ("7.3", 1500, "nbd", False)],
    ids=["6.12-ublk-mtu1500", "6.12-nbd-mtu9000-copied-alone-py36", "7.3-ublk-mtu9000",
         "7.3-nbd-mtu1500"])
def test_attach_block_device(kernel, mtu, backend, alone):
    """attach against vblade: ext4, fio verify, partitions, ro, outages, SIGTERM, SIGKILL during
    a read and --recover, a hostile target, detach under load, flush.  Each backend at both MTUs
    and on both kernels; NBD also with aoe.py copied alone into an empty directory and run by
    Python 3.6, the oldest it runs on: no helper, the standard library only.  The hostile
    target runs in all four (both kernels, both backends); the idle time before an outage tests
    the engine, not the kernel: the 6.12 runs cover it with the helper (ublk) and in pure
    Python (alone)."""
    if backend == "ublk" or not alone:
        need(aoe.load_helper() is not None, "needs the compiled helper (python3 build_ffi.py)")
    python, before = sys.executable, ""
    if alone:
        python = python_version_binary(OLDEST_PYTHON)
        before = 'd=$(mktemp -d) && cp aoe.py "$d" && AOE_PY="$d/aoe.py" '
    if kernel != min(VM_SUITES):
        before += "SKIP=idle "
    native = (os.path.exists("/dev/ublk-control") if backend == "ublk"
              else os.path.isdir("/sys/module/nbd"))
    # this machine's kernel runs it once, not per VM kernel
    if native and kernel != min(VM_SUITES):
        pytest.skip("this machine's own kernel ran the attach check (the %s case)" % min(VM_SUITES))
    if native:                                     # this kernel can: no VM needed
        r = subprocess.run(["bash", "-c",
                            before + " ".join([os.path.join(HERE, "vm", "attach-check.sh"), python,
                                               str(mtu), backend])],
                           cwd=HERE, capture_output=True, text=True, timeout=1500)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-2000:])
        out = r.stdout
    else:
        out = in_vm("attach-check.sh", mtu, backend, python=python, before=before, timeout=1500,
                    kernel=kernel)
    assert "ATTACH-CHECK OK mtu %d backend %s" % (mtu, backend) in out
    assert "== a hostile target" in out and "== hostile: skipped" not in out, out[-3000:]
    assert ("== idle: skipped" in out) == ("SKIP=idle" in before), out[-3000:]
    if alone:
        assert re.search(r"aoe\.py \S+ \(python %s\.\d+, helper not built"
                         % re.escape(OLDEST_PYTHON), out), out[:2000]
    # e2fsck -fn clean
    assert "Pass 5: Checking group summary information" in out and "Fix?" not in out
    assert "Oops" not in out and "BUG:" not in out, out[-3000:]


# kernel -> (MTU, vm/depth-check.sh's cases: backend:target:data path)
DEPTH_CASES = {"6.12": (9000, ("nbd:vblade:helper", "ublk:serve:helper", "nbd:vblade:python")),
               "7.3": (1500, ("ublk:vblade:helper", "nbd:serve:helper"))}


@pytest.mark.vm
@pytest.mark.parametrize("kernel", list(DEPTH_CASES))
def test_attach_at_depth_against_64_buffers(kernel):
    """attach against targets with 64 buffers (vblade -b 64; serve, its fast path), reads and
    writes mixed at depth 64 (4k) and 32 (64k), each read and each write checked by fio (crc32c
    and offset), the written region against the target's file; the daemon alive and up
    afterwards, the kernel silent, and the window at 64: its limit the target's buffer count,
    64 frames in flight at 64k.  Each backend against each target with the helper once, split
    over the two kernels: 6.12 at MTU 9000 (nbd with vblade, ublk with serve, nbd in pure
    Python: ublk has no pure-Python path), 7.3 at MTU 1500 (ublk with vblade, nbd with serve).
    With vblade's default of 16 buffers no more than 16 answers waited for the kernel at once;
    33 overflowed the nbd bridge's batch."""
    pairs = {case.rsplit(":", 1)[0] for _, cases in DEPTH_CASES.values() for case in cases
             if case.endswith(":helper")}
    assert pairs == {"ublk:vblade", "ublk:serve", "nbd:vblade", "nbd:serve"}
    need(aoe.load_helper() is not None, "needs the compiled helper (python3 build_ffi.py)")
    mtu, cases = DEPTH_CASES[kernel]
    out = in_vm("depth-check.sh", mtu, *cases, kernel=kernel)
    assert "DEPTH-CHECK OK mtu %d %s" % (mtu, " ".join(cases)) in out, out[-3000:]
    for case in cases:
        for size, depth in (("4k", 64), ("64k", 32)):
            line = re.search(r"^%s %s qd%d: read \d+ IOPS .*, verify errors (\d+); frames in "
                             r"flight at most (\d+), window limit (\d+) " % (case, size, depth),
                             out, re.M)
            assert line, (case, size, out[-3000:])
            errors, most, limit = map(int, line.groups())
            assert errors == 0 and limit == 64, line.group(0)
            if size == "64k":
                assert most == 64, line.group(0)
        assert "%s: daemon alive, up, no kernel message, the writer's region equals the " \
               "target's file" % case in out, out[-3000:]
    assert "Oops" not in out and "BUG:" not in out, out[-3000:]


@pytest.mark.vm
@BOTH_KERNELS
def test_revalidate_resizes_and_upgrade_hands_over(kernel):
    """The queue's ring takes COOP_TASKRUN on both kernels.  Where ublk has UPDATE_SIZE and
    QUIESCE (Linux 6.16+): revalidate grows the attached device under a mounted ext4 (resize2fs
    sees it), refuses a shrink below it, and attach --upgrade hands the device to a new daemon
    under a reader that sees no error.  Where it lacks them: one clear line each, nothing
    changed."""
    need(aoe.load_helper() is not None, "needs the compiled helper (python3 build_ffi.py)")
    out = in_vm("resize-upgrade.sh", kernel=kernel)
    m = re.search(r"^RESIZE-UPGRADE OK (\d+)\.(\d+)\S* features: (.*)$", out, re.M)
    assert m, out[-3000:]
    features = m.group(3).split()
    newer = (int(m.group(1)), int(m.group(2))) >= (6, 16)
    assert ("update-size" in features and "quiesce" in features) == newer, (m.group(0), newer)
    assert "coop-taskrun" in features, m.group(0)                   # both kernels are 5.19+
    if newer:
        assert "resized from 262144 to 393216 sectors" in out and "handed e0.0 to pid" in out
        assert "refusing to cut what it holds" in out
    else:
        assert "has no UPDATE_SIZE (Linux 6.16 or later)" in out
        assert "without ublk's QUIESCE (Linux 6.16 or later)" in out
    assert "Pass 5: Checking group summary information" in out and "Fix?" not in out


@pytest.mark.vm
def test_64_devices_in_one_process():
    """64 targets attached by one attach --all: one process serves them, in at most 128 MB
    (PSS); two take writes at once; one is detached alone and one whose thread fails is left
    for attach --recover while the others go on; after a SIGKILL of the process,
    attach --all --recover serves them again in one process; flush -a detaches them all."""
    need(aoe.load_helper() is not None, "needs the compiled helper (python3 build_ffi.py)")
    out = in_vm("many-check.sh", 64, 128)
    assert "MANY-CHECK OK 64" in out, out[-3000:]
    memory = re.search(r"^MEMORY 64 idle devices in one process: PSS (\d+) MB", out, re.M)
    assert memory and int(memory.group(1)) <= 128, out[-3000:]
    assert "Oops" not in out and "BUG:" not in out


@pytest.mark.vm
def test_attach_all_watch_and_units_as_systemd_runs_them():
    """attach --all with patterns, then the rest; --watch (NOTIFY_SOCKET) is READY once they are
    attached (taking back one whose daemon was killed), attaches a target that starts later,
    detaches one left down; a unit's stop
    detaches all; attach --foreground says READY=1 only with the device there."""
    need(aoe.load_helper() is not None, "needs the compiled helper (python3 build_ffi.py)")
    out = in_vm("watch-check.sh")
    assert "WATCH-CHECK OK" in out, out[-3000:]
    assert re.search(r"^e3\.1 started later: attached after \d+ s$", out, re.M)
    assert re.search(r"^e1\.2's target stopped: detached after \d+ s$", out, re.M)
    assert "Oops" not in out and "BUG:" not in out


# -----------------------------------------------------------------------------
# fuzz: the libFuzzer targets of the C helper (fuzz/), built with clang
# -----------------------------------------------------------------------------

FUZZ_DIR = os.path.join(HERE, "fuzz")
FUZZ_TARGETS = sorted(os.path.basename(c)[:-2] for c in glob.glob(os.path.join(FUZZ_DIR, "*.c")))
# Below this many inputs a second a target has stopped working as a fuzzer (each input
# waiting 50 ms on a timeout, say): the slowest, nbd, runs some 300 a second on two busy
# cores, and still 70 on two overloaded ones while it loads a large corpus.
FUZZ_EXECS_PER_SECOND = 20
# ... and below this many edges of coverage it never gets far into the helper (setup
# failing, say): each target reaches several hundred within seconds.
FUZZ_COVERAGE = 100


@pytest.mark.fuzz
@pytest.mark.parametrize("target", FUZZ_TARGETS)
def test_fuzz_target_finds_nothing(target):
    """fuzz/run: the target's checked-in corpus (seeds and every past finding) passes, then
    AOE_FUZZ_SECONDS (60) of fuzzing find no crash, sanitizer report, broken invariant, leak,
    timeout or excessive allocation, at a pace and a coverage that show the target works."""
    need(shutil.which("clang"), "needs clang with its fuzzer and sanitizer runtimes "
                                "(Debian: clang, libclang-rt-dev)")
    seconds = int(os.environ.get("AOE_FUZZ_SECONDS", "60"))
    run = subprocess.run([os.path.join(FUZZ_DIR, "run"), target, str(seconds)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=seconds + 600)
    summary = re.search(r"^FUZZ (\S+) execs (\d+) cov (\d+) ft (\d+) corpus (\d+) seconds (\d+) "
                        r"(\w+)$", run.stdout, re.M)
    assert run.returncode == 0 and summary and summary.group(7) == "OK", \
        run.stdout + run.stderr[-3000:]
    assert summary.group(1) == target
    execs, cov = int(summary.group(2)), int(summary.group(3))
    assert execs >= FUZZ_EXECS_PER_SECOND * seconds, summary.group(0)
    assert cov >= FUZZ_COVERAGE, summary.group(0)
