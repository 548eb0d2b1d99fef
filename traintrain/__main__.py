"""Command line: `python -m traintrain {train,demo,ui,bench} …`; a TrainTrainError prints its message and exits 2."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from traintrain.errors import TrainTrainError
from traintrain.progress import StopFlag, console_progress

ROOT = Path(__file__).resolve().parents[1]


def _dirs(out: str | None):
    from traintrain.modes import OutputDirs

    lora = Path(out) if out else ROOT / "output"
    return OutputDirs(lora=lora, logs=ROOT / "logs", jsons=ROOT / "jsons")


@contextlib.contextmanager
def _stop_on_signals(save: bool) -> Iterator[StopFlag]:
    """A stop flag the first Ctrl-C or SIGTERM sets (the run stops after its step, saving what it has when `save`);
    a second one aborts. Held while the model loads too, so a signal then also ends with a message."""
    stop = StopFlag()

    def handler(_signum, _frame) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        print("\nStopping after this step (Ctrl-C again to abort)…", file=sys.stderr)
        stop.request(save=save)

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _train(config_path: str, model: str | None, out: str | None) -> int:
    from traintrain.config import TrainConfig
    from traintrain.config_compat import normalised
    from traintrain.models.open import open_model
    from traintrain.modes import RunContext, run_training
    from traintrain.preflight import check_before_model

    config, notes = normalised(TrainConfig.load_json(Path(config_path)))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if model:
        config.model = model
    check_before_model(config, model_files=True)
    with _stop_on_signals(config.save_on_stop) as stop:
        bundle = open_model(
            config.model, vae=config.vae, v_pred=config.model_v_pred, precision=config.train_model_precision
        )
        if stop.requested:
            print("Stopped while loading the model: nothing was trained.", file=sys.stderr)
            return 130
        result = run_training(RunContext(config, bundle, _dirs(out), progress=console_progress(), stop=stop))
    print(result.message)
    print(f"first loss {result.first_loss:.5f}, last loss {result.last_loss:.5f}, steps {result.steps}")
    return 0


def _demo(out: str | None, iterations: int) -> int:
    from traintrain.demo import demo_config, write_sample_images
    from traintrain.models.open import open_model
    from traintrain.modes import RunContext, run_training

    with tempfile.TemporaryDirectory(prefix="traintrain-demo-") as tmp:
        config = demo_config(write_sample_images(Path(tmp) / "images"), iterations)
        bundle = open_model("tiny", precision=config.train_model_precision)
        result = run_training(RunContext(config, bundle, _dirs(out), progress=console_progress()))
    print(f"first loss {result.first_loss:.5f}, last loss {result.last_loss:.5f} ({result.steps} steps)")
    print(f"saved {result.path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from traintrain.bench import run_bench, settings_from_args

    run_bench(settings_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it."""
    parser = argparse.ArgumentParser(prog="python -m traintrain", description="TrainTrain LoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a settings JSON (the UI's / a preset's format)")
    train.add_argument("--config", required=True, help="settings JSON file")
    train.add_argument("--model", help="checkpoint (.safetensors), diffusers folder, or tiny / tiny-sd2 / tiny-sdxl")
    train.add_argument("--out", help="folder for the LoRA files (default: ./output)")
    demo = sub.add_parser("demo", help="train the tiny built-in model on generated images")
    demo.add_argument("--out", help="folder for demo.safetensors (default: ./output)")
    demo.add_argument("--iterations", type=int, default=80)
    from traintrain.bench import add_bench_arguments  # torch only: diffusers is imported when a bench runs

    add_bench_arguments(sub.add_parser("bench", help="time the real LoRA / iLECO step against a bare reference step"))
    ui = sub.add_parser("ui", help="serve the TrainTrain UI in a browser (standalone gradio)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    ui.add_argument("--auth", help="user:password to log in with (required with a --host other than this machine)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--model", default="tiny", help="what an empty Model box trains: checkpoint, diffusers folder or tiny")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "ui":
            from traintrain.ui.standalone import launch, parse_auth

            launch(args.host, args.port, args.model, auth=parse_auth(args.auth) if args.auth else None)
            return 0
        if args.command == "bench":
            return _bench(args)
        if args.command == "train":
            return _train(args.config, args.model, args.out)
        return _demo(args.out, args.iterations)
    except TrainTrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Aborted: nothing more was saved.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
