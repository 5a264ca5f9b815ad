"""The "Live conversation" tab: our own client (api/static/live.js, a <moshi-live> element) over /api/chat."""

import gradio as gr

LIVE_CLIENT_HEAD = '<script src="/api/chat/static/live.js"></script>'


def live_tab() -> None:
    with gr.Tab("Live conversation"):
        gr.Markdown("Press *Start talking*, allow the microphone, and speak: Moshi listens and "
                    "answers at the same time. Headphones keep its voice out of your microphone.")
        gr.HTML("<moshi-live></moshi-live>", head=LIVE_CLIENT_HEAD, js_on_load=None)
