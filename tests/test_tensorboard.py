"""TensorBoard event files: CRC-32C and TFRecord framing by the format's rules, Event / Summary fields decoded by a
plain protobuf reader, and a training run's loss and learning rates logged per step."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from traintrain.demo import demo_config, write_sample_images
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.tensorboard import EventWriter, crc32c


def masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records(path: Path) -> list[bytes]:
    """The TFRecords of a file, each checked against its length and data CRCs."""
    data, out, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        assert struct.unpack_from("<I", data, at + 8)[0] == masked(data[at : at + 8])
        body = data[at + 12 : at + 12 + length]
        assert struct.unpack_from("<I", data, at + 12 + length)[0] == masked(body)
        out.append(body)
        at += 16 + length
    return out


def fields(message: bytes) -> list[tuple[int, object]]:
    """(field number, value) pairs of a protobuf message: varints as ints, fixed64 as double, fixed32 as float,
    length-delimited as bytes."""
    out, at = [], 0

    def varint() -> int:
        nonlocal at
        value = shift = 0
        while True:
            byte = message[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while at < len(message):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire == 1:
            out.append((number, struct.unpack_from("<d", message, at)[0]))
            at += 8
        elif wire == 5:
            out.append((number, struct.unpack_from("<f", message, at)[0]))
            at += 4
        else:
            length = varint()
            out.append((number, message[at : at + length]))
            at += length
    return out


def scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of an event file; its first event must carry the file version."""
    events = [dict(fields(body)) for body in records(path)]
    assert events[0][3] == b"brain.Event:2" and isinstance(events[0][1], float)
    found: dict[str, list[tuple[int, float]]] = {}
    for event in events[1:]:
        for number, value in fields(event[5]):
            entry = dict(fields(value))
            assert number == 1
            found.setdefault(entry[1].decode(), []).append((event.get(2, 0), entry[2]))
    return found


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283 and crc32c(b"") == 0


def test_scalars_round_trip(tmp_path):
    writer = EventWriter(tmp_path / "run")
    writer.scalars(1, {"loss": 0.25, "lr/unet": 1e-4})
    writer.scalars(300, {"loss": 0.125})
    writer.close()
    (path,) = list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert scalars(path) == {"loss": [(1, 0.25), (300, 0.125)], "lr/unet": [(1, pytest.approx(1e-4))]}


def test_a_training_logs_every_steps_loss_and_learning_rates(tmp_path):
    images = write_sample_images(tmp_path / "images")
    config = dataclasses.replace(demo_config(images, iterations=5), logging_tensorboard=True, logging_save_csv=False)
    result = run_training(RunContext(config, build_tiny("sd1"), OutputDirs(tmp_path, tmp_path / "logs", tmp_path)))
    (path,) = list((tmp_path / "logs/tensorboard").glob("demo-*/events.out.tfevents.*"))
    logged = scalars(path)
    assert [step for step, _ in logged["loss"]] == [1, 2, 3, 4, 5]
    assert [value for _, value in logged["loss"]] == pytest.approx(result.losses, rel=1e-6)
    assert set(logged) == {"loss", "lr/text_encoder", "lr/unet"}
    assert [value for _, value in logged["lr/unet"]] == pytest.approx([5e-3] * 5)
