"""YMODEM sender against a receiver written from the protocol (U-Boot's loady is the e2e one)."""

import binascii
import queue
import threading
import time

import pytest

from edgevirt.console import ymodem
from edgevirt.console.ymodem import ACK, CRC, EOT, NAK, SOH, STX, YmodemError


class Receiver:
    """Receives one file; NAKs block ``nak_block`` once (to exercise retries)."""

    def __init__(self, nak_block=None, c_after_header=True, drop_first_block=False):
        self.to_sender: queue.Queue[int] = queue.Queue()
        self.buf = bytearray()
        self.cond = threading.Condition()
        self.nak_block = nak_block
        self.c_after_header = c_after_header  # U-Boot's xyzModem sends no 'C' after block 0
        self.drop_first_block = drop_first_block  # not ready: block 1 is lost, then 'C'
        self.name = b""
        self.data = bytearray()
        self.size = 0

    # sender side
    def getc(self, timeout):
        try:
            return self.to_sender.get(timeout=timeout)
        except queue.Empty:
            return None

    def put(self, data):
        with self.cond:
            self.buf += data
            self.cond.notify()

    # receiver side
    def _take(self, n):
        with self.cond:
            while len(self.buf) < n:
                self.cond.wait(5)
            out = bytes(self.buf[:n])
            del self.buf[:n]
            return out

    def _block(self):
        head = self._take(1)[0]
        if head == EOT:
            return None, None
        size = 1024 if head == STX else 128
        seq, inv = self._take(2)
        data = self._take(size)
        crc = int.from_bytes(self._take(2), "big")
        assert head in (SOH, STX) and seq == 0xFF - inv
        assert crc == binascii.crc_hqx(data, 0)
        return seq, data

    def run(self):
        self.to_sender.put(CRC)
        _, meta = self._block()
        name, rest = meta.split(b"\0", 1)
        self.name, self.size = name, int(rest.split(b" ")[0])
        self.to_sender.put(ACK)
        if self.c_after_header:
            self.to_sender.put(CRC)
        if self.drop_first_block:
            seq, _ = self._block()
            assert seq == 1
            self.to_sender.put(CRC)  # "start sending": block 1 must come again
        naked = False
        while True:
            seq, data = self._block()
            if seq is None:
                self.to_sender.put(NAK)  # first EOT is NAKed, as many receivers do
                assert self._take(1)[0] == EOT
                self.to_sender.put(ACK)
                break
            if seq == self.nak_block and not naked:
                naked = True
                self.to_sender.put(NAK)
                continue
            self.data += data
            self.to_sender.put(ACK)
        self.to_sender.put(CRC)
        seq, data = self._block()
        assert seq == 0 and data == bytes(128)  # end of batch
        self.to_sender.put(ACK)


@pytest.mark.parametrize("size", [0, 1, 1024, 5000])
def test_file_arrives_whole_with_name_and_size(tmp_path, size):
    f = tmp_path / "guest.dtb"
    f.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    rx = Receiver(nak_block=2)
    t = threading.Thread(target=rx.run)
    t.start()
    assert ymodem.send(rx.getc, rx.put, f) == size
    t.join(5)
    assert rx.name == b"guest.dtb" and rx.size == size
    assert bytes(rx.data[:size]) == f.read_bytes()
    assert set(rx.data[size:]) <= {0x1A}  # CPMEOF padding


def test_silent_receiver_is_a_clear_error(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"x")
    with pytest.raises(YmodemError, match="no 'C' \\(receiver ready\\) from the receiver"):
        ymodem.send(lambda t: None, lambda d: None, f, start_timeout=0.3)


@pytest.mark.parametrize("drop_first_block", [False, True])
def test_receiver_without_c_after_block0_is_not_waited_for(tmp_path, drop_first_block):
    """U-Boot ACKs block 0 and waits for block 1 without a 'C': the sender must not stall
    until the receiver's own timeout (4.25 s per file under QEMU) or its block timeout."""
    f = tmp_path / "Image"
    f.write_bytes(bytes(range(256)) * 20)
    rx = Receiver(c_after_header=False, drop_first_block=drop_first_block)
    t = threading.Thread(target=rx.run, daemon=True)
    t.start()
    t0 = time.monotonic()
    assert ymodem.send(rx.getc, rx.put, f, block_timeout=5) == len(f.read_bytes())
    elapsed = time.monotonic() - t0
    t.join(5)
    assert bytes(rx.data[: rx.size]) == f.read_bytes()
    assert elapsed < 2.0, f"sender stalled {elapsed:.2f}s"


def test_lzma_alone_is_cached_by_content(tmp_path):
    import lzma
    import os

    from edgevirt.deploy.uboot import lzma_alone

    out = tmp_path / "k.lzma"
    lzma_alone(b"a" * 100000, out)
    assert lzma.decompress(out.read_bytes(), format=lzma.FORMAT_ALONE) == b"a" * 100000
    assert out.read_bytes()[5:13] == b"\xff" * 8  # size "unknown": what lzmadec accepts
    os.utime(out, (1, 1))
    lzma_alone(b"a" * 100000, out)  # same input: reused
    assert out.stat().st_mtime == 1
    lzma_alone(b"b" * 100000, out)  # another input: compressed again
    assert lzma.decompress(out.read_bytes(), format=lzma.FORMAT_ALONE) == b"b" * 100000
