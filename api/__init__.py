"""REST batch API (FastAPI): routes that queue the `moshi_core` pipelines as jobs.

Not built yet: the codec, dialogue, transcription and TTS endpoints land with their issues.
"""
