"""The web UI: one module per Gradio tab, assembled with the API into one server by `ui.app`."""
