"""Job execution: the job records and their files, the pipelines, and the two queues that
run them (Celery workers on Redis, or threads in the API process when no REDIS_URL is set).

`celery -A workers worker ...` finds the Celery application here.
"""


def __getattr__(name: str):
    # Celery's `-A workers` looks for `workers.app`; importing it lazily keeps `import workers.jobs`
    # (the API, the tests) from building a Celery app it does not need.
    if name in ("app", "celery"):
        from .celery_app import app

        return app
    raise AttributeError(name)
