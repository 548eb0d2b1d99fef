"""WebUI entry point: registers the TrainTrain tab and its setting.

The WebUI runs this file with the extension folder on sys.path only while importing it, so the `traintrain` package
is imported here at the top (its submodules load later through the cached package), and the extension folder is
read now, before `scripts.basedir()` changes (webui.md §1.1). The UI and the training stack load when the tab is
built; the WebUI adds `style.css` and `javascript/` to the page itself. The host (AUTOMATIC1111, Forge, Forge Neo,
reForge) is told by `traintrain.hosts.detect_host`.
"""

from __future__ import annotations

from pathlib import Path

from modules import script_callbacks, scripts, shared

from traintrain import hosts

EXTENSION_DIR = Path(scripts.basedir())
TAB_TITLE, TAB_ID = "TrainTrain", "traintrain"
SETTINGS_SECTION = ("traintrain", "TrainTrain")


def on_ui_tabs() -> list[tuple]:
    """The TrainTrain tab: the shared UI over the host's model, its checkpoint and VAE lists and its Lora folder."""
    from traintrain.jobs import shared_queue
    from traintrain.modes import OutputDirs
    from traintrain.ui.app import build_ui

    host = hosts.detect_host()
    dirs = OutputDirs(lora=host.lora_dir(), logs=EXTENSION_DIR / "logs", jsons=EXTENSION_DIR / "jsons")
    provider = host.provider()
    queue_file = EXTENSION_DIR / "queue.json"
    blocks = build_ui(
        provider,
        dirs,
        EXTENSION_DIR / "presets",
        queue_file,
        model_choices=host.model_choices,
        vae_choices=host.vae_choices,
    )
    provider.on_interrupt = lambda: shared_queue(provider, dirs, queue_file).stop()
    return [(blocks, TAB_TITLE, TAB_ID)]


def on_ui_settings() -> None:
    """Settings > TrainTrain: the folder trained LoRAs go to."""
    label = "Folder for trained LoRAs (empty: the WebUI's Lora folder, --lora-dir)"
    option = shared.OptionInfo("", label, section=SETTINGS_SECTION).needs_reload_ui()
    shared.opts.add_option(hosts.LORA_DIR_OPTION, option)


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
