"""`imagic batch --ray`. On a new local Ray: the sequential runner's bytes, so a batch resumes across runners; a pair
whose worker is killed run again; no Ray process left behind, not even by a killed driver. On a head started as the
README says, with Ray's token authentication on: the README's commands, and a wrong or a missing token in one line."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest
import torch

from imagic.cli import main

FAST = ["--embedding-steps", "2", "--finetune-steps", "2", "--steps", "2", "--quiet", "--method", "lora",
        "--lora-rank", "2"]
NAMES = ("dog.png-a_photo_of_a_sitting_dog.png", "cat.jpeg-a_photo_of_a_red_cat.png")
ROOT = Path(__file__).resolve().parents[1]
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"  # the CLI of this interpreter's Ray


@contextmanager
def _descendants(pid: int) -> Iterator[dict[int, psutil.Process]]:
    """The processes that became descendants of `pid` while the block runs, noted every 0.1 s (Ray's agents stop
    being anyone's descendants when their raylet dies, so they are noted while they are). Those already running
    (multiprocessing's resource tracker, started by an earlier test) are not the block's."""
    before = {child.pid for child in psutil.Process(pid).children(recursive=True)}
    seen: dict[int, psutil.Process] = {}
    done = threading.Event()

    def note() -> None:
        while not done.wait(0.1):
            with suppress(psutil.Error):
                for child in psutil.Process(pid).children(recursive=True):
                    if child.pid not in before:
                        seen.setdefault(child.pid, child)

    thread = threading.Thread(target=note)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()


def _left_running(processes, seconds: float) -> list[str]:
    """The command lines of those of `processes` still running after up to `seconds`; killed, so that a failing
    test leaves nothing behind either."""
    deadline = time.monotonic() + seconds
    while (running := [p for p in processes if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = []
    for process in running:
        with suppress(psutil.Error):
            left.append(" ".join(process.cmdline()).strip()[:80])
            process.kill()
    return left


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE  # a zombie only waits for its parent
    except psutil.NoSuchProcess:
        return False


def _environment(**extra: str) -> dict[str, str]:
    """This process's environment without Ray's settings (a Ray started in this process sets RAY_AUTH_MODE)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **extra}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _batch(bench_folder, sd1_folder, out, *options) -> int:
    return main(["batch", str(bench_folder), "--model", str(sd1_folder), "--out", str(out), *options])


@pytest.fixture
def four_threads():
    """Torch on 4 threads, its default on a 4-core machine: this model's sums come out otherwise than on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def test_ray_writes_the_sequential_runners_bytes_so_a_batch_resumes_across_runners(bench_folder, sd1_folder, tmp_path,
                                                                                   capsys, four_threads):
    assert _batch(bench_folder, sd1_folder, tmp_path / "sequential", *FAST) == 0
    with _descendants(os.getpid()) as started:
        assert _batch(bench_folder, sd1_folder, tmp_path / "ray", "--ray", *FAST) == 0
    assert "2 edited, 0 already" in capsys.readouterr().out
    for name in NAMES:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes()
    assert started, "no Ray process was seen"
    assert not _left_running(started.values(), 5), "Ray processes outlived the run that started them"
    (tmp_path / "resumed").mkdir()  # a batch that Ray left half done, finished without Ray
    shutil.copy(tmp_path / "ray" / NAMES[0], tmp_path / "resumed" / NAMES[0])
    assert _batch(bench_folder, sd1_folder, tmp_path / "resumed", *FAST) == 0
    assert "1 edited, 1 already" in capsys.readouterr().out
    for name in NAMES:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes()


def test_a_pair_whose_worker_dies_is_run_again(bench_folder, sd1_folder, tmp_path):
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
    code = _batch(bench_folder, sd1_folder, tmp_path / "ray", "--ray", *slow)
    killer.join()
    assert killed and code == 0
    assert _batch(bench_folder, sd1_folder, tmp_path / "sequential", *slow) == 0
    for name in NAMES:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes()


def _editing(process: psutil.Process) -> bool:
    """Whether `process` is a Ray worker running an edit (a task names its process after its function)."""
    with suppress(psutil.Error):
        return any("_edit_on_worker" in part for part in process.cmdline())
    return False


def test_a_killed_driver_leaves_no_ray_process(bench_folder, sd1_folder, tmp_path):
    driver = subprocess.Popen([sys.executable, "-m", "imagic.cli", "batch", str(bench_folder), "--model",
                               str(sd1_folder), "--out", str(tmp_path / "ray"), "--ray", *FAST, "--finetune-steps", "150"],
                              cwd=ROOT, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with _descendants(driver.pid) as started:
        deadline = time.monotonic() + 120
        while not any(_editing(process) for process in list(started.values())):
            if time.monotonic() > deadline or driver.poll() is not None:
                driver.kill()
                pytest.fail(f"no edit started: {_left_running(list(started.values()), 0)}")
            time.sleep(0.2)
        driver.kill()  # SIGKILL: nothing of the driver's runs after it
        driver.wait()
    assert not _left_running(started.values(), 20), "Ray processes outlived their killed driver"


@pytest.fixture
def ray_head(tmp_path_factory):
    """A head and a worker node on this machine, started as the README says, token authentication on; yields the
    address, the head's home (its ~/.ray/auth_token) and the token. Its processes are killed whatever happens."""
    home, elsewhere = tmp_path_factory.mktemp("head_home"), tmp_path_factory.mktemp("worker_home")
    temps = [tmp_path_factory.mktemp("ray") for _ in range(2)]  # short paths: Ray's sockets live under them
    port, sessions = _free_port(), set()
    # Test-only options: free ports, two CPUs in all, no dashboard, each node's session under the test's folder.
    own = ["--num-cpus", "1", "--disable-usage-stats"]

    def ray_start(*options: str, **environment: str) -> None:
        """`ray start` in a session of its own, which every process it starts stays in."""
        start = subprocess.Popen([RAY, "start", *options, *own, "--dashboard-agent-listen-port", str(_free_port())],
                                 env=_environment(**environment), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
        sessions.add(start.pid)
        output = start.communicate(timeout=120)[0]
        assert start.returncode == 0, output

    try:
        token = subprocess.run([RAY, "get-auth-token", "--generate"], env=_environment(HOME=str(home)),
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip()
        ray_start("--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", str(temps[0]),
                  HOME=str(home))
        ray_start("--address", f"127.0.0.1:{port}", "--temp-dir", str(temps[1]), HOME=str(elsewhere),
                  RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        yield f"127.0.0.1:{port}", home, token
    finally:
        for process in psutil.process_iter():
            with suppress(OSError, psutil.Error):
                if os.getsid(process.pid) in sessions:
                    process.kill()


def test_the_readme_cluster_recipe_and_a_wrong_or_missing_token_in_one_line(ray_head, bench_folder, sd1_folder,
                                                                             tmp_path):
    address, head_home, token = ray_head
    nowhere = tmp_path / "home"  # a machine without a token
    nowhere.mkdir()

    def batch(**environment: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "imagic.cli", "batch", str(bench_folder), "--model", str(sd1_folder),
                   "--out", str(tmp_path / "out"), "--ray", address, *FAST]
        return subprocess.run(command, cwd=ROOT, env=_environment(**environment), capture_output=True, text=True,
                              timeout=300)

    on_the_head = batch(HOME=str(head_home))  # the token in ~/.ray/auth_token, nothing set
    assert on_the_head.returncode == 0, on_the_head.stderr
    assert "2 edited, 0 already" in on_the_head.stdout
    elsewhere = batch(HOME=str(nowhere), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)  # the README's export
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "0 edited, 2 already" in elsewhere.stdout
    wrong, missing = batch(HOME=str(nowhere), RAY_AUTH_TOKEN="0" * 64), batch(HOME=str(nowhere))
    assert "refused this machine's token (from RAY_AUTH_TOKEN)" in wrong.stderr
    assert "wants a token, and none was sent" in missing.stderr
    for refused in (wrong, missing):
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert refused.stderr.startswith(f"imagic: error: the Ray cluster at '{address}'")
        assert refused.stderr.endswith("set RAY_AUTH_TOKEN to the token that `ray get-auth-token` prints on the "
                                       "cluster's head\n")


def test_a_bad_ray_address_is_one_line(bench_folder, sd1_folder, tmp_path, capsys):
    assert _batch(bench_folder, sd1_folder, tmp_path / "o", "--ray", "head:port", *FAST) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ray 'head:port' is not a Ray address" in err


def test_without_ray_batch_ray_says_how_to_install_it(bench_folder, sd1_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert _batch(bench_folder, sd1_folder, tmp_path / "o", "--ray", *FAST) == 1
    assert 'batch --ray needs Ray: pip install "imagic[ray]"' in capsys.readouterr().err
