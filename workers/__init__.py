"""Celery workers: load a model once per process and run the `moshi_core` pipelines as jobs.

Not built yet: they land with the REST API issue.
"""
