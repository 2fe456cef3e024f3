"""Stage 2 sharded over two processes (torchrun, gloo on the CPU) follows the single-process run on the tiny SD1 folder:
the same losses and an edit state that samples to the same images, written by the main process alone."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imagic
from imagic import sharding
from imagic.cli import main
from imagic.editor import ImagicEditor
from imagic.errors import SettingsError
from imagic.state import EditState

from helpers import quick_settings

TEXT = "a photo of a sitting dog"
FAST = ["--embedding-steps", "3", "--finetune-steps", "4", "--method", "full", "--finetune-lr", "1e-3",
        "--eta", "0.6", "1", "--steps", "3", "--quiet"]
# Both runs draw the same noise; the sharded one averages two equal gradients and updates each weight in the process
# that holds it. On this CPU its losses were within 1.2e-7 of the single run's, its weights within 1.5e-6, its
# images within 1 of 255: the tolerances leave room for other CPUs' reduction order.
LOSS_TOLERANCE = 1e-5
PIXEL_TOLERANCE = 2  # of 255, per channel
WEIGHT_TOLERANCE = 1e-4


def _two_processes(argv: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m imagic.cli ARGV` (a free port of its own); on a timeout its
    whole process group is killed, so that no process outlives the test."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "imagic.cli", *argv]
    here = str(Path(imagic.__file__).parents[1])  # the imagic under test, wherever the processes start
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of the launch is left, on a timeout or Ctrl-C
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def runs(sd1_folder, photo, tmp_path_factory):
    """The same edit in one process and sharded over two."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    assert main(["edit", str(photo), TEXT, "--model", str(sd1_folder), "--out", str(one), *FAST]) == 0
    result = _two_processes(["edit", str(photo), TEXT, "--model", str(sd1_folder), "--out", str(two), *FAST])
    assert result.returncode == 0, result.stderr[-2000:]
    return one, two, result


def _summary(folder) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_sharded_losses_match_one_process(runs):
    one, two = (_summary(folder) for folder in runs[:2])
    assert (one["processes"], two["processes"]) == (1, 2)
    for stage in ("embedding", "fine_tune"):
        expected, sharded = one["losses"][stage]["per_step"], two["losses"][stage]["per_step"]
        assert len(sharded) == len(expected) > 0
        np.testing.assert_allclose(sharded, expected, rtol=LOSS_TOLERANCE, atol=LOSS_TOLERANCE)


def test_sharded_state_samples_to_the_same_images(runs):
    one, two, _ = runs
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # nothing else, no leftovers
    expected, sharded = EditState.load(one / "state.safetensors"), EditState.load(two / "state.safetensors")
    assert sharded.weights.keys() == expected.weights.keys() == {"unet"}
    assert sharded.weights["unet"].keys() == expected.weights["unet"].keys()
    for name in ("eta0.6_seed0.png", "eta1_seed0.png"):
        a, b = (np.asarray(Image.open(folder / name), dtype=np.int16) for folder in (one, two))
        assert np.abs(a - b).max() <= PIXEL_TOLERANCE, name
    for name, weight in expected.weights["unet"].items():
        assert (sharded.weights["unet"][name] - weight).abs().max() <= WEIGHT_TOLERANCE, name


def test_only_the_main_process_speaks(runs):
    result = runs[2]
    assert result.stdout.count("wrote 2 edited image(s)") == 1
    assert "imagic:" not in result.stderr and "Traceback" not in result.stderr


def test_sharding_refuses_lora_before_training(sd1_pipe, photo, monkeypatch):
    monkeypatch.setattr(sharding, "active", lambda: True)
    with pytest.raises(SettingsError, match="shard full fine-tuning only, not lora"):
        ImagicEditor(sd1_pipe).train(photo, TEXT, quick_settings("lora"), progress=False,
                                     callback=lambda *step: pytest.fail("trained"))
