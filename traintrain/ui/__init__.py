"""The gradio UI shared by the WebUI tab and `python -m traintrain ui`."""

from traintrain.ui.app import TrainTrainUI, build_ui, create_ui

__all__ = ["TrainTrainUI", "build_ui", "create_ui"]
