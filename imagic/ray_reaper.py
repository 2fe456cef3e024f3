"""Ends a local Ray's processes when the `imagic batch --ray` that started it ends, however it ends (SIGKILL too).

Ray ends its GCS and raylet with the driver (the kernel's parent-death signal), but the raylet's agents then try to
tell the dead GCS for a minute before they exit, no longer children of anything of Ray's, and with their environment
overwritten by their process titles. So this process, started by ray_cluster.py right after Ray (argv: the pids of
the processes Ray started; stdin: a pipe from the driver), notes their descendants every second while they run, and
when the pipe closes (the driver left Ray, or died) kills every one still running. It is run as a file, so that it
starts at once and whatever imported imagic: its folder, imagic/, comes first on its sys.path, and it imports only
psutil and the standard library, no module name of which an imagic module takes.
"""

import select
import sys

import psutil

SWEEP_S = 1.0  # how often descendants are noted; Ray starts its agents with the raylet, and they live as long


def main(pids: list[int]) -> None:
    roots = []
    for pid in pids:
        try:
            roots.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    seen = {process.pid: process for process in roots}  # Process objects: a pid used again is not killed
    while not select.select([sys.stdin], [], [], SWEEP_S)[0]:  # the driver never writes: readable is the end
        seen = _noted(roots, seen)
    seen = _noted(roots, seen)
    ending = [process for process in seen.values() if process.is_running()]
    for process in ending:
        try:
            process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(ending, timeout=10)


def _noted(roots: list[psutil.Process], seen: dict[int, psutil.Process]) -> dict[int, psutil.Process]:
    seen = {pid: process for pid, process in seen.items() if process.is_running()}
    for root in roots:
        try:
            for child in root.children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
    return seen


if __name__ == "__main__":
    main([int(pid) for pid in sys.argv[1:]])
