"""`imagic batch --ray` on a local Ray with two CPUs: the sequential runner's outputs byte for byte, a pair
whose worker is killed run again, finished pairs skipped."""

import threading
import time

import psutil
import pytest
import torch

from imagic.cli import main

ray = pytest.importorskip("ray", reason='pip install "imagic[ray]"')

FAST = ["--embedding-steps", "2", "--finetune-steps", "2", "--steps", "2", "--quiet", "--method", "lora",
        "--lora-rank", "2"]
NAMES = ("dog.png-a_photo_of_a_sitting_dog.png", "cat.jpeg-a_photo_of_a_red_cat.png")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _sequential(bench_folder, sd1_folder, out, *options) -> None:
    """The sequential runner on one thread, as each Ray task runs (one CPU each): the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["batch", str(bench_folder), "--model", str(sd1_folder), "--out", str(out), *options]) == 0
    finally:
        torch.set_num_threads(threads)


def test_ray_gives_the_sequential_outputs_and_a_rerun_skips_them(local_ray, bench_folder, sd1_folder, tmp_path,
                                                                 capsys):
    _sequential(bench_folder, sd1_folder, tmp_path / "sequential", *FAST)
    command = ["batch", str(bench_folder), "--model", str(sd1_folder), "--out", str(tmp_path / "ray"), "--ray", *FAST]
    assert main(command) == 0
    assert "2 edited, 0 already" in capsys.readouterr().out
    for name in NAMES:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes()
    assert main(command) == 0
    assert "0 edited, 2 already" in capsys.readouterr().out


def test_a_pair_whose_worker_dies_is_run_again(local_ray, bench_folder, sd1_folder, tmp_path):
    slow = [*FAST, "--finetune-steps", "150"]  # long enough to be caught running
    killed: list[int] = []

    def kill_the_first_worker_editing() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for process in psutil.process_iter(["cmdline"]):
                if any("_edit_on_worker" in part for part in process.info["cmdline"] or ()):
                    process.kill()
                    killed.append(process.pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_worker_editing)
    killer.start()
    code = main(["batch", str(bench_folder), "--model", str(sd1_folder), "--out", str(tmp_path / "ray"), "--ray",
                 *slow])
    killer.join()
    assert killed and code == 0
    _sequential(bench_folder, sd1_folder, tmp_path / "sequential", *slow)
    for name in NAMES:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes()


def test_without_ray_batch_ray_says_how_to_install_it(bench_folder, sd1_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    assert main(["batch", str(bench_folder), "--model", str(sd1_folder), "--out", str(tmp_path / "o"), "--ray",
                 *FAST]) == 1
    assert 'batch --ray needs Ray: pip install "imagic[ray]"' in capsys.readouterr().err
