"""`imagic batch --ray`: a batch's pairs as Ray tasks, one edit per task, across a machine's or a cluster's
GPUs (one each) or CPUs (one each), on a Ray joined by ray_cluster.joined.

Ray is an optional extra (`pip install "imagic[ray]"`). Each task loads the model once per worker
process, edits its pair with the same code as the sequential runner (batch.edit_one) and writes the
output atomically into the run's staging folder inside the shared output folder; the driver commits each
output as its task finishes, so a rerun skips what is done. A pair that fails
with a user error comes back as a one-line reason while the others go on; a task whose worker dies
(killed, out of memory) is run again by Ray, up to RETRIES times.
"""

from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from .batch import EDIT_THREADS, EditPair, edit_one, is_whole_image, report
from .memory import MemorySettings
from .settings import SampleSettings, TrainSettings

RETRIES = 3  # a pair's task is run again this many times if its worker process dies

_editors: dict = {}  # per worker process: the loaded model, by its loading options


def _edit_on_worker(model: dict, pair: EditPair, folder: Path, out: Path, settings: TrainSettings, eta: float,
                    seed: int, sample_settings: SampleSettings, memory: MemorySettings) -> dict:
    import ray

    from .editor import ImagicEditor

    gpu = bool(ray.get_gpu_ids())
    key = (tuple(sorted(model.items())), gpu)
    if key not in _editors:
        _editors[key] = ImagicEditor.from_pretrained(**model, device="cuda" if gpu else "cpu")
    return edit_one(_editors[key], pair, folder, out, settings, eta=eta, seed=seed, sample_settings=sample_settings,
                    memory=memory)


def edit_pairs_on_ray(
    model: dict, pairs: list[EditPair], folder: Path, out: Path, settings: TrainSettings, *, eta: float, seed: int,
    sample_settings: SampleSettings, progress: bool = True, edited: Callable[[EditPair], None] | None = None,
    memory: MemorySettings = MemorySettings(),
) -> list[dict]:
    """Edit every pair without a whole output as a task on the Ray this process joined (ray_cluster.joined);
    returns a record per pair, as batch.edit_pairs does. `model` holds ImagicEditor.from_pretrained's loading
    options (model, torch_dtype, config, allow_pickle, super_resolution). `edited(pair)` is called as each pair's
    output is done, in the order they finish (the CLI commits it into the folder then)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    # As many CPUs as an edit has threads (batch.EDIT_THREADS): the sequential runner's arithmetic, and its bytes.
    task = ray.remote(num_cpus=EDIT_THREADS, num_gpus=1 if gpus else 0, max_retries=RETRIES)(_edit_on_worker)
    records, running = [], {}
    for pair in pairs:
        if is_whole_image(out / pair.output_name):
            records.append({"pair": pair.output_name, "status": "kept"})
        else:
            running[task.remote(model, pair, folder, out, settings, eta, seed, sample_settings, memory)] = pair
    bar = tqdm(total=len(running), desc="edits", disable=not progress)
    try:
        while running:
            [finished], _ = ray.wait(list(running), num_returns=1)
            pair = running.pop(finished)
            try:
                record = ray.get(finished)
            except ray.exceptions.RayError as error:  # its worker died more often than it is retried
                reason = " ".join(str(error).split())[:300]
                record = {"pair": pair.output_name, "status": "failed", "reason": f"its Ray task failed: {reason}"}
            report(pair, record)
            if edited is not None and record["status"] == "edited":
                edited(pair)
            records.append(record)
            bar.update()
    except KeyboardInterrupt:
        for ref in running:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    return records
