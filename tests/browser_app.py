"""Helper of test_browser.py: serve the standalone UI (tiny model) with its files under a given folder.

Usage: python tests/browser_app.py ROOT PORT
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from traintrain.ui.standalone import launch  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    launch("127.0.0.1", int(sys.argv[2]), "tiny", root=Path(sys.argv[1]))
