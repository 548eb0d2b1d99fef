"""TensorBoard event files written directly (TFRecord framing, hand-encoded Event / Summary protobufs), so logging
to TensorBoard needs no TensorBoard, TensorFlow or protobuf package; `tensorboard --logdir logs/tensorboard` reads them."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

from traintrain.errors import TrainTrainError


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + _masked(length) + data + _masked(data)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def event(wall_time: float, step: int = 0, *, file_version: str = "", scalars: dict[str, float] | None = None) -> bytes:
    """A serialized tensorflow.Event: wall time, step, and a file version or a Summary of simple scalar values."""
    body = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version:
        body += _field(3, 2, file_version.encode())
    if scalars:
        values = b"".join(
            _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
            for tag, value in scalars.items()
        )
        body += _field(5, 2, values)
    return body


class EventWriter:
    """Appends scalar events to `events.out.tfevents.<time>.<host>` in `folder` (one folder = one run in TensorBoard)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        now = time.time()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.path = self.folder / f"events.out.tfevents.{int(now)}.{socket.gethostname() or 'localhost'}"
            self._file = self.path.open("ab")
        except OSError as error:
            raise TrainTrainError(f"Cannot write TensorBoard logs in {self.folder}: {error.strerror or error}.") from error
        self._file.write(record(event(now, file_version="brain.Event:2")))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log `values` (tag -> number) at `step`."""
        self._file.write(record(event(time.time(), step, scalars=values)))

    def flush(self) -> None:
        """Hand what was logged to the OS, so a running TensorBoard sees it."""
        self._file.flush()

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()
