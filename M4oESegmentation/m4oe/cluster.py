"""``m4oe batch`` on Dask distributed: one task per case, the model loaded once per worker.

The scheduling, retries and worker restarts are Dask's. A worker plugin loads the model when a
worker starts (also a worker that joins later or that its nanny restarts); each task reads,
segments and writes its case on the worker (a file system shared by the workers and the client is
assumed: the inputs and the output folder must have the same paths everywhere) and returns the
case's summary row, which the client puts in the summary. A worker killed mid-case leaves only
temporary files; Dask runs the case again elsewhere, and a case whose worker died after writing it
is found finished (:func:`m4oe.batch.finished_record`) and not written again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker
from distributed.scheduler import KilledWorker

from .batch import BatchSettings, run_case
from .batch_summary import BatchProgress, Summary, failed_row
from .cases import Case
from .errors import InputError, M4oEError

PLUGIN = "m4oe-predictor"
CONNECT_TIMEOUT = "30s"


class PredictorPlugin(WorkerPlugin):
    """Holds a worker's :class:`~m4oe.predictor.Predictor`, loaded in :meth:`setup`."""

    def __init__(self, settings: BatchSettings):
        self.settings = settings
        self.predictor = None

    def setup(self, worker) -> None:
        self.predictor = self.settings.load_predictor(device=worker_device(self.settings.device, worker.name))


def worker_device(device: str, worker_name) -> str:
    """The device of a worker: with ``auto`` or ``cuda`` and several GPUs visible, the local
    cluster's worker ``k`` (its name) gets ``cuda:k mod GPUs``; otherwise ``device`` unchanged (a
    cluster job that sees one GPU, as SLURM or Kubernetes give it, uses that one)."""
    if device not in ("auto", "cuda") or not str(worker_name).isdigit():
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{int(worker_name) % count}" if count > 1 else device


def _run_case_task(case: Case, settings: BatchSettings) -> dict:
    worker = get_worker()
    return run_case(worker.plugins[PLUGIN].predictor, case, settings, worker=str(worker.name))


def run_on_dask(
    cases: list[Case],
    settings: BatchSettings,
    summary: Summary,
    progress: BatchProgress,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
) -> None:
    """Run ``cases`` on a Dask cluster: the scheduler at ``scheduler`` (``tcp://host:8786``), else a
    :class:`LocalCluster` of ``workers`` processes of one thread each (``settings.threads`` default:
    the CPU cores shared out between them; no memory limit, so that Dask never pauses a worker
    holding a model). Rows go to ``summary`` (written after each case) as the cases finish.

    A case whose workers died ``distributed.scheduler.allowed-failures`` + 1 times (3 + 1 by
    default: a scan too large for a worker's memory) is recorded as failed. A model that a worker
    cannot load raises here (the plugin's error).
    """
    # Dask logs every worker and connection at INFO; a worker lost or restarted (a WARNING) is news.
    logging.getLogger("distributed").setLevel(max(logging.WARNING, logging.getLogger().level))
    cluster = None
    if scheduler is None:
        if settings.threads is None:
            settings = replace(settings, threads=max(1, (os.cpu_count() or 1) // workers))
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=0,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
    try:
        try:
            client = Client(cluster if cluster is not None else scheduler, timeout=CONNECT_TIMEOUT)
        except OSError as error:
            raise InputError(f"cannot reach the Dask scheduler {scheduler} ({error})") from None
        with client:
            client.register_plugin(PredictorPlugin(settings), name=PLUGIN)
            progress.emit(
                {"stage": "load", "fraction": 1.0, "workers": len(client.scheduler_info()["workers"])}
            )
            progress.start()
            futures = {
                client.submit(
                    _run_case_task, case, settings, key=f"m4oe-{settings.run_id}-{case.case_id}"
                ): case
                for case in cases
            }
            for future in as_completed(futures):
                case = futures[future]
                try:
                    row = future.result()
                except KilledWorker as error:
                    reason = M4oEError(
                        f"its worker died every time it ran (out of memory?): {error}", case.input
                    )
                    row = failed_row(case, reason, {})
                except Exception as error:
                    row = failed_row(case, error, {})
                future.release()
                summary.set(row)
                summary.refresh()
                progress.case(row, summary)
    finally:
        if cluster is not None:
            cluster.close()
