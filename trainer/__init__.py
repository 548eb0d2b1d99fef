"""TrainTrain: LoRA / iLECO / Difference / ADDifT training for Stable Diffusion, in the WebUI or standalone."""

from trainer.errors import TrainTrainError

__all__ = ["TrainTrainError"]
