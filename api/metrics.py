"""Prometheus text format, computed from the job records at each scrape.

The records are the truth shared by the API and every worker, so any API process can
answer for all of them without a metrics registry of its own.
"""

from collections import Counter, defaultdict

from workers.errors import QueueUnavailableError
from workers.jobs import JobKind, JobState

from .service import JobService


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def render_metrics(jobs: JobService) -> str:
    states: Counter[tuple[str, str]] = Counter()
    waited: dict[str, list[float]] = defaultdict(list)
    ran: dict[str, list[float]] = defaultdict(list)
    attempts = 0
    for job in jobs.store.all():
        states[job.kind.value, job.state.value] += 1
        attempts += max(job.attempts - 1, 0)
        if job.started_at is not None:
            waited[job.kind.value].append(job.started_at - job.created_at)
            if job.finished_at is not None and job.state is JobState.SUCCEEDED:
                ran[job.kind.value].append(job.finished_at - job.started_at)

    lines = ["# HELP moshi_jobs Jobs on record (kept for the retention time after they finish), by kind and state.",
             "# TYPE moshi_jobs gauge"]
    for kind in JobKind:
        for state in JobState:
            lines.append(f"moshi_jobs{_labels(kind=kind.value, state=state.value)} {states[kind.value, state.value]}")
    for name, what, values in (("moshi_job_queued_seconds", "Time from accepted to started", waited),
                               ("moshi_job_run_seconds", "Time from started to succeeded", ran)):
        lines += [f"# HELP {name} {what}, jobs on record.", f"# TYPE {name} summary"]
        for kind in JobKind:
            v = values[kind.value]
            lines.append(f"{name}_sum{_labels(kind=kind.value)} {sum(v):.6f}")
            lines.append(f"{name}_count{_labels(kind=kind.value)} {len(v)}")
    lines += ["# HELP moshi_job_redeliveries Extra starts of jobs on record (a worker died while running them).",
              "# TYPE moshi_job_redeliveries gauge", f"moshi_job_redeliveries {attempts}"]
    try:
        depth = jobs.queue.depth()
        up = 1
    except QueueUnavailableError:
        depth, up = {}, 0
    lines += ["# HELP moshi_queue_depth Jobs waiting for a worker, by queue.", "# TYPE moshi_queue_depth gauge"]
    lines += [f"moshi_queue_depth{_labels(queue=name)} {n}" for name, n in sorted(depth.items())]
    lines += ["# HELP moshi_queue_up Whether the queue (Redis) answers.", "# TYPE moshi_queue_up gauge",
              f"moshi_queue_up {up}"]
    return "\n".join(lines) + "\n"
