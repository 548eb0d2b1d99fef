"""The one exception type for problems a user can fix."""


class TrainTrainError(Exception):
    """A user-facing error: the message says what to change. The UI shows it, the CLI prints it and exits 2."""
