"""The command line: demo and train run end to end; a user error prints its message and exits 2."""

from __future__ import annotations

import dataclasses

from traintrain.__main__ import main
from traintrain.demo import demo_config, write_sample_images


def test_demo_writes_the_lora_and_prints_losses(tmp_path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path), "--iterations", "4"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "demo.safetensors").exists()
    assert "first loss" in out and "last loss" in out and str(tmp_path / "demo.safetensors") in out


def test_train_from_a_settings_json(tmp_path, capsys) -> None:
    config = dataclasses.replace(demo_config(write_sample_images(tmp_path / "images"), 3), save_lora_name="cli")
    config.save_json(tmp_path / "settings.json")
    code = main(["train", "--config", str(tmp_path / "settings.json"), "--model", "tiny", "--out", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "cli.safetensors").exists()
    assert "Successfully created" in capsys.readouterr().out


def test_user_error_exits_2_with_the_message(tmp_path, capsys) -> None:
    config = dataclasses.replace(demo_config(tmp_path / "missing", 3), network_rank=0)
    config.save_json(tmp_path / "bad.json")
    assert main(["train", "--config", str(tmp_path / "bad.json"), "--model", "tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "rank" in err and "missing" in err
    assert main(["train", "--config", str(tmp_path / "nope.json"), "--model", "tiny"]) == 2
