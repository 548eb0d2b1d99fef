"""TrainTrain: LoRA / iLECO / Difference / ADDifT training for Stable Diffusion, in the WebUI or standalone."""

from traintrain.errors import TrainTrainError

__all__ = ["TrainTrainError"]
