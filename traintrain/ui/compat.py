"""The few places where gradio 3.41 (the WebUI's) and gradio 4+ differ: image inputs, tables, page CSS and head."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def image_input(label: str, elem_id: str, visible: bool = True) -> gr.Image:
    """An upload-only RGBA image input that hands a PIL image to handlers."""
    source = {"source": "upload"} if GRADIO_MAJOR < 4 else {"sources": ["upload"]}
    return gr.Image(label=label, type="pil", image_mode="RGBA", elem_id=elem_id, visible=visible, **source)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether `fn` names the keyword `name` (a catch-all `**kwargs` does not count: gradio 3 ignores unknown ones)."""
    return name in inspect.signature(fn).parameters


def table(headers: list[str], elem_id: str, label: str, value: Callable[[], list], every: float) -> gr.Dataframe:
    """A read-only table with these headers, refreshed from `value()` every `every` seconds while the page is open."""
    size = {"max_height": 400} if _accepts(gr.Dataframe.__init__, "max_height") else {"height": 400}
    return gr.Dataframe(
        value=value, every=every, headers=headers, label=label, interactive=False, wrap=True, elem_id=elem_id, **size
    )


def blocks(css: str) -> gr.Blocks:
    """The Blocks container; gradio 3 and 4 take the page CSS here, later versions at launch (see `launch_options`)."""
    extra: dict[str, Any] = {"css": css} if css and _accepts(gr.Blocks.__init__, "css") else {}
    return gr.Blocks(analytics_enabled=False, title="TrainTrain", **extra)


def launch_options(css: str, head: str) -> dict[str, Any]:
    """Keyword arguments of `launch` for the page CSS and head: only where `launch` takes them (gradio 5+)."""
    options = {"css": css} if not _accepts(gr.Blocks.__init__, "css") else {}
    options["head"] = head
    return {key: value for key, value in options.items() if _accepts(gr.Blocks.launch, key)}


def add_head(blocks: gr.Blocks, head: str) -> None:
    """Put `head` (HTML) into the served page's head: gradio 4 keeps it on the Blocks, gradio 3 has no such option."""
    if _accepts(gr.Blocks.__init__, "head"):
        blocks.head = head
    elif not _accepts(gr.Blocks.launch, "head"):
        _add_head_to_templates(head)


def _add_head_to_templates(head: str) -> None:
    """gradio 3: add `head` to every served page the way the WebUI adds extension scripts."""
    import gradio.routes

    original = gradio.routes.templates.TemplateResponse
    if getattr(original, "traintrain_head", None) == head:
        return

    def template_response(*args: Any, **kwargs: Any):
        response = original(*args, **kwargs)
        response.body = response.body.replace(b"</head>", head.encode("utf-8") + b"</head>", 1)
        response.init_headers()
        return response

    template_response.traintrain_head = head  # type: ignore[attr-defined]
    gradio.routes.templates.TemplateResponse = template_response


def enable_queue(blocks: gr.Blocks, workers: int = 4) -> None:
    """Turn on the event queue (needed for polling) with a few events handled at once."""
    if GRADIO_MAJOR < 4:
        blocks.queue(concurrency_count=workers)
    else:
        blocks.queue(default_concurrency_limit=workers)


def keep_polling_single(blocks: gr.Blocks) -> None:
    """Stop a parent Blocks (the WebUI's) from attaching our `every=` polling a second time when it renders `blocks`.

    gradio 3.41 and 4+ attach a component's polling when a Blocks closes, for every component inside it, and keep
    the request on the component, so rendering our closed Blocks into another would poll twice as often.
    """
    for block in blocks.blocks.values():
        if getattr(block, "load_event_to_attach", None):
            block.load_event_to_attach = None
