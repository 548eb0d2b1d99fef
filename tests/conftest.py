"""Shared test setup: one CPU thread (fast and deterministic on 2 shared cores), offline hub, and the fixtures
several modules share: the pretrained shapes model (built once per session) and an original / target image pair."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from conditioned_tiny import circle, pretrained_tiny  # noqa: E402
from traintrain.models.diffusers_backend import DiffusersBundle  # noqa: E402

torch.set_num_threads(1)
log = logging.getLogger(__name__)


def probe_prediction(bundle: DiffusersBundle) -> torch.Tensor:
    """The prediction for "a red circle" on fixed latents and timesteps."""
    latents = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        cond = bundle.encode_text(["a red circle"]).repeat(4)
        return bundle.predict(latents, torch.tensor([100, 400, 700, 950]), cond)


@dataclass
class ShapesModel:
    """The pretrained tiny model shared by the tests, and its probe prediction right after pretraining."""

    bundle: DiffusersBundle
    probe: torch.Tensor

    def assert_untouched(self) -> None:
        """Runs and measurements left it as it was: no adapter hook, frozen weights, eval mode, same predictions."""
        modules = [self.bundle.components.unet, *self.bundle.components.text_encoders]
        assert not any(m._forward_hooks for root in modules for m in root.modules()), "an adapter stayed installed"
        assert not any(p.requires_grad for root in modules for p in root.parameters())
        assert not any(m.training for root in modules for m in root.modules())
        assert torch.equal(probe_prediction(self.bundle), self.probe), "a run or a measurement changed the model"


@pytest.fixture(scope="session")
def shapes_model() -> ShapesModel:
    """`build_tiny("sd1")` pretrained on coloured shapes (about 25 s on one CPU thread), shared by the session."""
    pretrained = pretrained_tiny()
    log.info(
        "shapes model: %.1f s, epsilon loss %.3f (first 20 steps) -> %.3f (last 50)",
        pretrained.seconds, pretrained.mean_loss(slice(0, 20)), pretrained.mean_loss(slice(-50, None)),
    )
    return ShapesModel(pretrained.bundle, probe_prediction(pretrained.bundle))


@pytest.fixture(scope="session")
def pair(tmp_path_factory) -> tuple[str, str]:
    """A red circle (original) and a blue one (target), 64x64."""
    folder: Path = tmp_path_factory.mktemp("pair")
    return circle(folder / "original.png", (220, 30, 30)), circle(folder / "target.png", (30, 60, 220))


# ----- in CI (CI=true) a skip is a failure, except for tests that need a GPU or a real host checkout (WebUI, Forge): every other
# dependency is installed by `install.py --tests` (ldm, playwright; Chromium by .ci/run), so a skip means it is missing.

ALLOWED_SKIP_REASONS = ("GPU", "WEBUI_DIR", "FORGE_DIR")
_refused_skips: list[str] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not (report.skipped and _in_ci()):
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    if not any(allowed in reason for allowed in ALLOWED_SKIP_REASONS):
        _refused_skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _refused_skips:
        print("\nIn CI only GPU and real-host tests may skip; these skipped (a test dependency is missing):")
        print("\n".join(f"  {line}" for line in _refused_skips))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
