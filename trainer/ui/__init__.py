"""The gradio UI shared by the WebUI tab and `python -m trainer ui`."""

from trainer.ui.app import TrainTrainUI, build_ui, create_ui

__all__ = ["TrainTrainUI", "build_ui", "create_ui"]
