"""Plot: a real CsvLog file becomes a figure with the logged points; names outside logs/ are refused."""

import os

import pytest

from traintrain.csvlog import CsvLog
from traintrain.errors import TrainTrainError
from traintrain.plot import find_log, plot_named, read_log


def _write_log(folder, stem, rows, lr_columns=2):
    log = CsvLog(folder / f"{stem}.csv", {"network_rank": 8, "save_lora_name": stem}, lr_columns)
    for step, loss, lrs in rows:
        log.add(step, loss, lrs)
    log.flush()
    return log.path


ROWS = [(1, 0.5, [1e-3, 5e-4]), (2, 0.4, [9e-4, 4e-4]), (3, 0.35, [8e-4, 3e-4])]


def test_plot_has_the_logged_points(tmp_path):
    _write_log(tmp_path, "demo-20250101_000000", ROWS)
    figure = plot_named(tmp_path, "demo-20250101_000000")
    loss_axis, lr_axis = figure.axes
    raw_line, loss_line = loss_axis.get_lines()
    assert list(loss_line.get_xdata()) == [1, 2, 3]
    assert list(raw_line.get_ydata()) == pytest.approx([0.5, 0.4, 0.35])
    assert list(loss_line.get_ydata()) == pytest.approx([0.5, 0.49, 0.476])  # EMA, weight 0.1 per new step
    lr_lines = lr_axis.get_lines()
    assert [line.get_label() for line in lr_lines] == ["Learning Rate 1", "Learning Rate 2"]
    assert list(lr_lines[1].get_ydata()) == pytest.approx([5e-4, 4e-4, 3e-4])
    assert lr_axis.get_ylabel() == "Learning Rates"
    assert "demo-20250101_000000" in figure._suptitle.get_text()
    assert loss_axis.get_legend() is not None


def test_header_rows_are_read(tmp_path):
    log = read_log(_write_log(tmp_path, "a", ROWS, lr_columns=1))
    assert log.header["network_rank"] == "8"
    assert list(log.table.columns) == ["Step", "Loss", "Learning Rate 1", "Raw Loss"]


def test_the_originals_log_without_raw_loss_plots(tmp_path):
    """A log the original wrote (smoothed Loss only) still plots: one loss line, the learning rates beside it."""
    rows = [f"{key},1" for key in ("network_rank", "network_alpha", "train_learning_rate", "train_iterations",
                                  "train_lr_scheduler", "model_version", "train_optimizer", "save_lora_name")]
    (tmp_path / "old.csv").write_text("\n".join([*rows, "Step,Loss,Learning Rate 1", "1,0.2,0.001", "2,0.19,0.0009"]))
    loss_axis, lr_axis = plot_named(tmp_path, "old").axes
    assert [list(line.get_ydata()) for line in loss_axis.get_lines()] == [pytest.approx([0.2, 0.19])]
    assert len(lr_axis.get_lines()) == 1


def test_blank_name_picks_the_newest_log(tmp_path):
    old = _write_log(tmp_path, "old", ROWS)
    new = _write_log(tmp_path, "new", ROWS[:2])
    os.utime(old, (1, 1))
    assert find_log(tmp_path, "") == new
    assert len(plot_named(tmp_path).axes[0].get_lines()[0].get_xdata()) == 2


@pytest.mark.parametrize("name", ["../x.csv", "..", "sub/x.csv", "sub\\x.csv", "/etc/passwd"])
def test_paths_are_refused(tmp_path, name):
    with pytest.raises(TrainTrainError, match="plain file name"):
        find_log(tmp_path, name)


def test_missing_logs_say_what_to_do(tmp_path):
    with pytest.raises(TrainTrainError, match="logging save csv"):
        find_log(tmp_path, "")
    with pytest.raises(TrainTrainError, match="No log named nope.csv"):
        find_log(tmp_path, "nope")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(TrainTrainError, match="not a TrainTrain CSV log"):
        read_log(tmp_path / "bad.csv")


def test_plot_refuses_wildcards(tmp_path) -> None:
    import pytest

    from traintrain.errors import TrainTrainError

    (tmp_path / "a.csv").write_text("Step,Loss\n1,0.5\n")
    with pytest.raises(TrainTrainError, match="plain file name"):
        find_log(tmp_path, "*")
