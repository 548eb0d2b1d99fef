"""Data-parallel training on the CPU (gloo): 2 ranks × batch 1 train the LoRA 1 process × batch 2 trains, rank 0 alone
writes, and a stop or a NaN on rank 1 ends both ranks after the same step with one save."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from traintrain import distributed
from traintrain.config import TrainConfig
from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
DEADLINE_S = 240  # a 2-rank run of a few tiny steps takes seconds; a hang must fail the test, not the suite


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dirs_in(tmp: Path) -> OutputDirs:
    return OutputDirs(lora=tmp / "Lora", logs=tmp / "logs", jsons=tmp / "jsons")


def lora_config(images: Path, **changes) -> TrainConfig:
    """SGD: its update is linear in the gradient, so a missing or unscaled average shows (Adam would hide a factor)."""
    base = demo_config(images, iterations=4)
    settings = {"save_precision": "fp32", "save_as_json": True, "train_optimizer": "SGDNesterov", **changes}
    return dataclasses.replace(base, train_learning_rate=0.5, **settings)


def ileco_config(images: Path, **changes) -> TrainConfig:
    return lora_config(images, mode="iLECO", original_prompt="red circle", target_prompt="blue square", **changes)


def single_process(config: TrainConfig, tmp: Path, **changes):
    """The reference: one process, batch `WORLD` × the config's batch."""
    config = dataclasses.replace(config, train_batch_size=config.train_batch_size * WORLD, **changes)
    return run_training(RunContext(config, build_tiny("sd1"), dirs_in(tmp)))


def _rank_main(rank: int, port: int, config_json: str, tmp: str, fault: str) -> None:
    """One spawned rank: join the group as torchrun's environment describes it, train, record the outcome."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(WORLD)
    torch.set_num_threads(1)
    config = TrainConfig.from_json_dict(json.loads(config_json))
    bundle = build_tiny("sd1")
    ctx = RunContext(config, bundle, dirs_in(Path(tmp)))
    if rank == 1 and fault == "stop":
        ctx.progress = lambda p: ctx.stop.request() if p.step == 2 else None
    if rank == 1 and fault == "nan":
        bundle.predict = _nan_after(bundle.predict, calls=3)
    outcome: dict = {}
    with distributed.process_group():
        try:
            result = run_training(ctx)
            outcome = {"steps": result.steps, "stopped": result.stopped, "path": str(result.path)}
        except TrainTrainError as error:
            outcome = {"error": str(error)}
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(outcome))


def _nan_after(predict, calls: int):
    count = 0

    def predict_then_nan(*args, **kwargs):
        nonlocal count
        count += 1
        out = predict(*args, **kwargs)
        return out * float("nan") if count > calls else out

    return predict_then_nan


def spawn_ranks(config: TrainConfig, tmp: Path, fault: str = "") -> list[dict]:
    """Run `WORLD` ranks of `config` in spawned processes (killed at the deadline); each rank's outcome."""
    context = mp.start_processes(
        _rank_main, (free_port(), json.dumps(config.to_json_dict()), str(tmp), fault), nprocs=WORLD, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=5):
            assert time.monotonic() < deadline, "the ranks did not finish in time"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [json.loads((tmp / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def assert_same_lora(path: Path, reference: Path) -> None:
    got, want = load_file(str(path)), load_file(str(reference))
    assert got.keys() == want.keys()
    trained = [k for k in want if "lora_up" in k]
    assert any(want[k].abs().sum() > 0 for k in trained), "the reference must have trained"
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)


def written(tmp: Path) -> dict[str, list[str]]:
    return {kind: sorted(p.name for p in (tmp / kind).rglob("*") if p.is_file()) for kind in ("Lora", "logs", "jsons")}


def test_ileco_two_ranks_batch_one_equal_one_process_batch_two(images, tmp_path) -> None:
    config = ileco_config(images, train_batch_size=1)
    reference = single_process(config, tmp_path / "one")
    outcomes = spawn_ranks(config, tmp_path / "two")
    assert [o.get("steps") for o in outcomes] == [4, 4], outcomes
    assert_same_lora(tmp_path / "two" / "Lora" / "demo.safetensors", reference.path)
    files = written(tmp_path / "two")
    assert files["Lora"] == ["demo.safetensors"] and len(files["logs"]) == 1 and len(files["jsons"]) == 1, files
    saved = json.loads(next((tmp_path / "two" / "jsons").rglob("*.json")).read_text())
    assert int(saved["train_batch_size"]) == 1, "the settings JSON records the per-rank batch"


def test_lora_mode_through_torchrun_equals_one_process_batch_two(images, tmp_path) -> None:
    config = lora_config(images, train_batch_size=1, logging_save_csv=False, save_as_json=False)
    reference = single_process(config, tmp_path / "one")
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config.to_json_dict()))
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", "--master-addr=127.0.0.1",
        f"--master-port={free_port()}", "-m", "traintrain", "train", "--config", str(config_path), "--model", "tiny",
        "--out", str(tmp_path / "two"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Successfully created") == 1, done.stdout  # rank 0 alone reports
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["demo.safetensors"]
    assert_same_lora(tmp_path / "two" / "demo.safetensors", reference.path)  # text encoder LoRA included


def test_stop_on_rank_one_stops_both_with_one_save(images, tmp_path) -> None:
    outcomes = spawn_ranks(lora_config(images, train_batch_size=1), tmp_path, fault="stop")
    assert outcomes[0] == outcomes[1] == {"steps": 2, "stopped": True, "path": outcomes[0]["path"]}, outcomes
    files = written(tmp_path)
    assert files["Lora"] == ["demo_2steps.safetensors"] and len(files["logs"]) == 1, files
    rows = next((tmp_path / "logs").rglob("*.csv")).read_text().splitlines()[9:]
    assert [row.split(",")[0] for row in rows] == ["1", "2"]


def test_nan_on_rank_one_ends_both_keeping_the_last_save(images, tmp_path) -> None:
    config = lora_config(images, train_batch_size=1, save_per_steps=2)
    outcomes = spawn_ranks(config, tmp_path, fault="nan")
    assert all("loss became nan" in o.get("error", "") for o in outcomes), outcomes
    assert all("at step 4" in o["error"] for o in outcomes), "rank 1's NaN appears at its 4th step on both ranks"
    assert written(tmp_path)["Lora"] == ["demo_2steps.safetensors"]


def test_without_a_launcher_nothing_changes(images) -> None:
    config = lora_config(images)
    assert distributed.launch_from_environment({}) is None
    assert distributed.launch_from_environment({"WORLD_SIZE": "1"}) is None
    assert distributed.with_global_batch(config) is config
    assert distributed.gradient_sync() is None and distributed.is_main()


def test_a_half_described_launch_is_refused() -> None:
    with pytest.raises(TrainTrainError, match="torchrun"):
        distributed.launch_from_environment({"WORLD_SIZE": "2", "RANK": "0"})
    launch = distributed.launch_from_environment(
        {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    )
    assert launch == distributed.Launch(rank=3, world_size=4, local_rank=1)
