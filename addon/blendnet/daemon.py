"""The local BlendNet daemon, seen from the add-on: where it keeps its data, how to start it, and
its HTTP API. No bpy here: these calls block, so the add-on makes them on its worker thread,
never on Blender's main thread.

Every failure is a DaemonError whose message an artist can act on.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

# How long one API call may take.
API_TIMEOUT = 10.0
# How long a started daemon may take to answer.
START_TIMEOUT = 30.0


class DaemonError(Exception):
    """A failure to tell the artist, as it is."""


def default_data_dir():
    """The platform data dir the daemon uses when none is given (as `blendnet` computes it)."""
    env = os.environ.get("BLENDNET_DATA_DIR")
    if env:
        return env
    home = os.path.expanduser("~")
    if sys.platform == "win32":
        return os.path.join(os.environ.get("APPDATA", home), "blendnet", "data")
    if sys.platform == "darwin":
        return os.path.join(home, "Library", "Application Support", "blendnet")
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
    return os.path.join(base, "blendnet")


def find_binary(configured):
    """The `blendnet` program: the configured path, else `blendnet` on PATH."""
    if configured:
        path = os.path.abspath(os.path.expanduser(configured))
        if not os.path.isfile(path):
            raise DaemonError(
                f"The blendnet program was not found at {path}: set its path in the BlendNet "
                "add-on preferences")
        if not os.access(path, os.X_OK):
            raise DaemonError(
                f"{path} is not executable: set the path of the blendnet program in the "
                "BlendNet add-on preferences")
        return path
    found = shutil.which("blendnet")
    if not found:
        raise DaemonError(
            "The blendnet program is not on PATH: install it (cargo install --path node/daemon) "
            "or set its path in the BlendNet add-on preferences")
    return found


def run_cli(binary, data_dir, args, timeout=120.0):
    """Runs `blendnet ARGS --data-dir DIR`; returns its stdout. A failure raises with the
    program's own error line."""
    try:
        done = subprocess.run(
            [binary, *args, "--data-dir", data_dir],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except OSError as e:
        raise DaemonError(f"Cannot run {binary}: {e.strerror or e}") from e
    except subprocess.TimeoutExpired as e:
        raise DaemonError(f"blendnet {args[0]} did not finish within {timeout:.0f} s") from e
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        message = next((line[len("error: "):] for line in lines if line.startswith("error: ")),
                       lines[-1] if lines else f"exit status {done.returncode}")
        raise DaemonError(message)
    return done.stdout


def is_initialized(data_dir):
    """Whether the data dir holds a node (made by `blendnet init` or `join`)."""
    return os.path.isfile(os.path.join(data_dir, "node.key"))


class Client:
    """The daemon's local API: its address and token come from the data dir."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        try:
            with open(os.path.join(data_dir, "api.addr"), encoding="utf-8") as f:
                self.addr = f.read().strip()
            with open(os.path.join(data_dir, "api.token"), encoding="utf-8") as f:
                self.token = f.read().strip()
        except FileNotFoundError as e:
            raise DaemonError(f"No BlendNet daemon is running for {data_dir}") from e
        except OSError as e:
            raise DaemonError(f"Cannot read the daemon's address in {data_dir}: {e}") from e

    def request(self, method, path, body=None, raw=False):
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(f"http://{self.addr}{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=API_TIMEOUT) as answer:
                payload = answer.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            try:
                text = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                pass
            raise DaemonError(f"The daemon refused: {text}") from e
        except (urllib.error.URLError, OSError) as e:
            raise DaemonError(f"No BlendNet daemon answers for {self.data_dir}") from e
        return payload if raw else json.loads(payload or b"null")

    def status(self):
        return self.request("GET", "/v1/status")

    def peers(self, pending=False):
        return self.request("GET", "/v1/peers?pending=true" if pending else "/v1/peers")

    def jobs(self):
        return self.request("GET", "/v1/jobs")

    def job(self, job):
        return self.request("GET", f"/v1/jobs/{urllib.parse.quote(job)}")

    def cancel(self, job):
        return self.request("DELETE", f"/v1/jobs/{urllib.parse.quote(job)}")

    def logs(self, job):
        return self.request("GET", f"/v1/jobs/{urllib.parse.quote(job)}/logs")

    def preview(self, job, frame, size):
        """A PNG of the frame merged from the slices done so far, or None when there is none
        yet."""
        try:
            return self.request(
                "GET", f"/v1/jobs/{urllib.parse.quote(job)}/preview?frame={frame}&size={size}",
                raw=True)
        except DaemonError as e:
            if isinstance(e.__cause__, urllib.error.HTTPError) and e.__cause__.code == 404:
                return None
            raise

    def invite(self, ttl_secs):
        return self.request("POST", "/v1/invites", {"ttl_secs": ttl_secs})["code"]

    def admit(self, fingerprint):
        return self.request("POST", "/v1/admit", {"fingerprint": fingerprint})


def connect(data_dir):
    """A client of the daemon if one answers, else None."""
    try:
        client = Client(data_dir)
        client.status()
        return client
    except DaemonError:
        return None


def ensure_running(binary, data_dir, log_path=None):
    """The daemon of `data_dir`, started (detached, so it outlives Blender) if none answers."""
    client = connect(data_dir)
    if client:
        return client
    if not is_initialized(data_dir):
        raise DaemonError(
            f"{data_dir} holds no BlendNet node yet: create a mesh or join one in the BlendNet "
            "add-on preferences")
    log_path = log_path or os.path.join(data_dir, "addon-daemon.log")
    try:
        log = open(log_path, "ab")
    except OSError as e:
        raise DaemonError(f"Cannot write the daemon's log {log_path}: {e}") from e
    kwargs = {}
    if sys.platform == "win32":
        kwargs["creationflags"] = subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        kwargs["start_new_session"] = True
    try:
        process = subprocess.Popen(
            [binary, "up", "--data-dir", data_dir],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True, **kwargs)
    except OSError as e:
        raise DaemonError(f"Cannot start {binary}: {e.strerror or e}") from e
    finally:
        log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        client = connect(data_dir)
        if client:
            return client
        if process.poll() is not None:
            raise DaemonError(f"The BlendNet daemon stopped at once: {last_error(log_path)}")
        time.sleep(0.2)
    raise DaemonError(f"The BlendNet daemon did not answer within {START_TIMEOUT:.0f} s; its log "
                      f"is {log_path}")


def last_error(log_path):
    """The daemon's last error line, for a message."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return f"see {log_path}"
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    return lines[-1] if lines else f"see {log_path}"
