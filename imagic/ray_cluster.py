"""Joining Ray for `imagic batch --ray`: a new Ray on this machine, or the cluster at an address, and what goes wrong
said in one line.

Ray 2.60's token authentication: a token is read from RAY_AUTH_TOKEN, else from the file RAY_AUTH_TOKEN_PATH names,
else from ~/.ray/auth_token (`ray get-auth-token --generate` writes one there and prints it). A new local Ray turns
authentication on and writes that file if it is missing; `ray start --head` turns it on when a token exists. A Ray
driver sends its token under RAY_AUTH_MODE=token, or when its address is "auto" and it has one; given a head's
address it sends none, and the head refuses it. Here a driver sends its token whenever it has one, as Ray does for
"auto" (RAY_AUTH_MODE, when set, still decides), so `imagic batch --ray HEAD:6379` works wherever the token is.
"""

import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import psutil

from .errors import ClusterError

TOKEN_HELP = "set RAY_AUTH_TOKEN to the token that `ray get-auth-token` prints on the cluster's head"
REAPER = Path(__file__).with_name("ray_reaper.py")


@contextmanager
def joined(address: str | None) -> Iterator[None]:
    """Ray for the block: the cluster at `address` ("auto", "HEAD_IP:6379"), or a new Ray on this machine (None),
    left again at the end. A Ray that this process joined before is used as it is, and left as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    reaper = None
    if address is None:
        reaper = _start_local()
    else:
        _connect(address)
    try:
        yield
    finally:
        ray.shutdown()
        if reaper is not None:  # the driver is done: the reaper ends what of the local Ray is still running
            reaper.stdin.close()
            try:
                reaper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def _start_local() -> subprocess.Popen:
    """A new Ray on this machine, and ray_reaper.py watching this process: Ray ends its GCS and raylet with the
    driver, but their agents outlived a killed driver by a minute or more."""
    import ray

    before = {child.pid for child in psutil.Process().children()}
    try:
        # No dashboard: nothing here reads it, and "imagic[ray]" installs Ray without its packages.
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (RuntimeError, OSError, ValueError) as error:  # OSError: ConnectionError too
        ray.shutdown()
        raise ClusterError(f"cannot start Ray on this machine: {_first_line(error)}") from None
    started = [str(child.pid) for child in psutil.Process().children() if child.pid not in before]
    # A session of its own keeps Ctrl-C in the terminal from ending it before it has done its job.
    return subprocess.Popen([sys.executable, str(REAPER), *started], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _connect(address: str) -> None:
    import ray
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    from ray.exceptions import AuthenticationError

    # Ray's core writes every failed try to file descriptor 2 itself; what failed is said once, below.
    with _quiet_stderr(), _environment("RAY_gcs_server_port_wait_time_s", "1"):  # one try, not 20: see below
        try:
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # Ray's rule for "auto"
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except AuthenticationError as error:  # token mode, but no token here, or an unreadable RAY_AUTH_TOKEN_PATH
            raise ClusterError(f"{error.message.rstrip('.')}: {TOKEN_HELP}") from None
        except ValueError as error:
            raise ClusterError(f"--ray '{address}' is not a Ray address ({_first_line(error)}): give HEAD_IP:PORT, "
                               "e.g. 10.0.0.5:6379, or auto") from None
        except (ConnectionError, RuntimeError) as error:
            if any("InvalidAuthToken" in str(cause) for cause in _causes(error)):
                raise ClusterError(_refused(address)) from None
            # One try waits up to about 40 s for a head that does not answer; more would only repeat it.
            raise ClusterError(f"cannot reach a Ray cluster at '{address}' ({_first_line(error)}): check the "
                               "address, and that `ray start --head` runs there") from None


def _refused(address: str) -> str:
    source = token_source()
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and source is not None:
        return f"the Ray cluster at '{address}' refused this machine's token (from {source}): {TOKEN_HELP}"
    unsent = " (RAY_AUTH_MODE is not token)" if source is not None else ""
    return f"the Ray cluster at '{address}' wants a token, and none was sent{unsent}: {TOKEN_HELP}"


def token_source() -> str | None:
    """Where Ray reads this machine's token, in Ray's order; None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return os.environ["RAY_AUTH_TOKEN_PATH"]
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def _causes(error: BaseException) -> Iterator[BaseException]:
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """`name` set to `value` for the block, unless the user set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Nothing of Ray's on stderr for the block: its C++ core writes to file descriptor 2, its Python logging to the
    sys.stderr of when Ray was imported (pytest's, say, not file descriptor 2), warnings to today's sys.stderr."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    ray_logger.setLevel(logging.CRITICAL)
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        ray_logger.setLevel(level)
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
