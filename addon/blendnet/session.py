"""What the add-on knows about the mesh, kept up to date by one worker thread.

Blender's main thread never waits on the network: it queues work (`Session.run`), and the
results come back as callbacks that `Session.pump` runs on the main thread, from a
`bpy.app.timers` timer in the UI (and directly in tests and background Blender, where timers do
not fire while a script runs).
"""

import atexit
import os
import queue
import shutil
import tempfile
import threading
import time

import bpy

from . import daemon

# How often the panels' data and the preview are refreshed.
REFRESH_SECONDS = 2.0
# The image the live preview is shown in.
PREVIEW_IMAGE = "BlendNet Preview"
# Longest side of the preview, in pixels.
PREVIEW_SIZE = 512


class Session:
    def __init__(self):
        self._work = queue.Queue()
        self._done = queue.Queue()
        self._busy = 0
        self._lock = threading.Lock()
        self._thread = None
        self._refreshing = False
        self._last_refresh = 0.0
        # What the panels show.
        self.error = ""
        self.message = ""
        self.status = None
        self.peers = []
        self.pending = []
        self.jobs = []
        self.job = None
        self.selected = ""
        self.invite = ""
        self.progress = {}
        self._preview_key = None
        # Made on the first preview, removed when Blender exits.
        self._preview_dir = None

    # The worker thread.

    def run(self, work, done=None):
        """Runs `work()` on the worker thread; then `done(result, error)` on the main thread,
        where `error` is the DaemonError's message (or None)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="blendnet", daemon=True)
            self._thread.start()
        with self._lock:
            self._busy += 1
        self._work.put((work, done))

    def _loop(self):
        while True:
            item = self._work.get()
            if item is None:
                return
            work, done = item
            try:
                result, error = work(), None
            except daemon.DaemonError as e:
                result, error = None, str(e)
            except Exception as e:  # a bug: still a message, never a dead worker
                result, error = None, f"BlendNet: {type(e).__name__}: {e}"
            self._done.put((done, result, error))
            with self._lock:
                self._busy -= 1

    def pump(self):
        """Runs the finished work's callbacks (main thread only)."""
        while True:
            try:
                done, result, error = self._done.get_nowait()
            except queue.Empty:
                return
            if done is not None:
                done(result, error)
            elif error:
                self.error = error

    def wait(self, timeout=60.0):
        """Waits until the queued work is done and its callbacks ran (tests, background)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            with self._lock:
                idle = self._busy == 0
            if idle and self._done.empty():
                return True
            time.sleep(0.05)
        return False

    def stop(self):
        if self._thread is not None and self._thread.is_alive():
            self._work.put(None)
            self._thread.join(timeout=5.0)
        self._thread = None

    # What the add-on does with it.

    def start_daemon(self, binary_setting, data_dir):
        """Finds the daemon of `data_dir`, or starts one."""
        def work():
            binary = daemon.find_binary(binary_setting)
            client = daemon.ensure_running(binary, data_dir)
            return client.status()

        def done(status, error):
            self.error = error or ""
            self.status = status
            if status:
                self.message = "BlendNet daemon ready"
        self.run(work, done)

    def refresh(self, data_dir):
        """Peers, jobs, the selected job and its preview (when due and none is running)."""
        if self._refreshing:
            return
        self._refreshing = True
        self._last_refresh = time.monotonic()
        selected = self.selected

        def work():
            client = daemon.Client(data_dir)
            peers, pending, jobs = client.peers(), client.peers(pending=True), client.jobs()
            job = client.job(selected) if selected else None
            png = None
            frame = preview_frame(job)
            if job and frame is not None:
                png = client.preview(selected, frame, PREVIEW_SIZE)
            return peers, pending, jobs, job, png

        def done(result, error):
            self._refreshing = False
            if error:
                self.error = error
                return
            self.error = ""
            self.peers, self.pending, self.jobs, self.job, png = result
            self._note_progress()
            if png:
                self._show_preview(png)
        self.run(work, done)

    def refresh_due(self):
        return not self._refreshing and time.monotonic() - self._last_refresh >= REFRESH_SECONDS

    def _note_progress(self):
        """Each job's work done, finished tasks and what the peers have rendered of their
        running ones ("live_units"), and when it advanced, for an ETA."""
        now = time.monotonic()
        running = {}
        for peer in self.peers:
            rendering = peer.get("rendering") or {}
            if rendering.get("job"):
                running[rendering["job"]] = (running.get(rendering["job"], 0)
                                             + rendering.get("samples_done", 0))
        for job in self.jobs:
            total = job.get("total_units", 0)
            done = min(job.get("done_units", 0) + running.get(job["id"], 0), total)
            job["live_units"] = done
            first = self.progress.setdefault(job["id"], (now, done))
            if done < first[1]:
                self.progress[job["id"]] = (now, done)
            job["eta_secs"] = eta(first, now, done, total)

    def _show_preview(self, png):
        """Loads the PNG into the "BlendNet Preview" image; the image is replaced, never the job."""
        key = hash(png)
        if key == self._preview_key:
            return
        self._preview_key = key
        if self._preview_dir is None:
            self._preview_dir = tempfile.mkdtemp(prefix="blendnet-preview-")
            atexit.register(shutil.rmtree, self._preview_dir, ignore_errors=True)
        path = os.path.join(self._preview_dir, "preview.png")
        with open(path, "wb") as f:
            f.write(png)
        image = bpy.data.images.get(PREVIEW_IMAGE)
        if image is None:
            image = bpy.data.images.load(path, check_existing=False)
            image.name = PREVIEW_IMAGE
        else:
            image.filepath = path
            image.reload()
        for window in getattr(bpy.context.window_manager, "windows", []):
            for area in window.screen.areas:
                if area.type in {"IMAGE_EDITOR", "PROPERTIES"}:
                    area.tag_redraw()


def preview_frame(job):
    """The frame to preview: the first one not finished, else the first."""
    if not job or not job.get("frames"):
        return None
    for frame in job["frames"]:
        if frame.get("samples_done", 0) < frame.get("samples", 0):
            return frame["frame"]
    return job["frames"][0]["frame"]


def eta(first, now, done, total):
    """Seconds left at the rate seen since `first` (time, units done), or None."""
    since, done_then = first
    if done >= total or done <= done_then or now <= since:
        return None
    rate = (done - done_then) / (now - since)
    return int((total - done) / rate)


SESSION = Session()
