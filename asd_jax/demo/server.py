"""The demo's web server (aiohttp): one page, one WebSocket per visitor, one generation at a time.

  GET /                the page (static/index.html, static/app.js: no front-end build step)
  GET /ws              the visitor's WebSocket (messages below)
  GET /video/ID.mp4    a finished generation as an mp4

Page -> server (JSON): {"type": "start", "prompt" | "class", "setting", "variant", "seed", "frames"},
{"type": "stop"}. Server -> page: JSON status messages ("hello" with the model's options, "queued"
with the position, "compiling", "started", "chunk" with the latency and FPS so far, "done",
"stopped", "error" with a message) and, per decoded frame, a binary message: a 4-byte big-endian
frame index followed by the frame as a JPEG.

Generations queue in order of arrival and run one at a time in a worker thread (`Scheduler`); a
visitor who closes the tab leaves the queue, or stops their running generation at its next chunk.
"""

from __future__ import annotations

import asyncio
import collections
import io
import itertools
import json
import logging
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from asd_jax.demo.engine import Engine, InputError

STATIC = Path(__file__).resolve().parent / "static"
KEEP_VIDEOS = 16
_log = logging.getLogger("asd_jax.demo")


def jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


class Visitor:
  """One WebSocket: messages from any thread are sent in order by one coroutine."""

  def __init__(self, ws, loop: asyncio.AbstractEventLoop):
    self.ws, self.loop = ws, loop
    self.outbox: asyncio.Queue = asyncio.Queue()
    self.job: Job | None = None
    self.closed = False

  def send(self, msg: dict[str, Any] | bytes) -> None:
    """Thread-safe."""
    if not self.closed:
      self.loop.call_soon_threadsafe(self.outbox.put_nowait, msg)

  async def pump(self) -> None:
    while True:
      msg = await self.outbox.get()
      if msg is None:
        return
      try:
        if isinstance(msg, bytes):
          await self.ws.send_bytes(msg)
        else:
          await self.ws.send_str(json.dumps(msg))
      except (ConnectionError, RuntimeError):
        return


class Job:
  _ids = itertools.count(1)

  def __init__(self, spec, visitor: Visitor):
    self.id = next(self._ids)
    self.spec, self.visitor = spec, visitor
    self.stop = threading.Event()


class Scheduler:
  """First come, first served, one generation at a time, in a worker thread."""

  def __init__(self, engine: Engine, videos: Path):
    self.engine, self.videos = engine, videos
    self.waiting: collections.deque[Job] = collections.deque()
    self.running: Job | None = None
    self.cv = threading.Condition()
    self._saved: collections.deque[Path] = collections.deque()
    self._thread = threading.Thread(target=self._work, name="demo-worker", daemon=True)
    self._closing = False
    self._thread.start()

  def submit(self, job: Job) -> None:
    with self.cv:
      self.waiting.append(job)
      self._positions()
      self.cv.notify()

  def cancel(self, job: Job) -> None:
    """Stops a running job at its next chunk, or takes a waiting one out of the queue."""
    job.stop.set()
    with self.cv:
      if job in self.waiting:
        self.waiting.remove(job)
        job.visitor.send({"type": "stopped", "frames": 0, "total": job.spec.frames,
                          "queued": True})
        job.visitor.job = None
        self._positions()

  def close(self) -> None:
    with self.cv:
      self._closing = True
      for job in self.waiting:
        job.stop.set()
      if self.running is not None:
        self.running.stop.set()
      self.cv.notify()
    self._thread.join(timeout=60)

  def _positions(self) -> None:
    running = 1 if self.running is not None else 0
    for i, job in enumerate(self.waiting):
      job.visitor.send({"type": "queued", "position": i + 1, "ahead": running + i})

  def _work(self) -> None:
    while True:
      with self.cv:
        while not self.waiting and not self._closing:
          self.cv.wait()
        if self._closing:
          return
        job = self.waiting.popleft()
        self.running = job
        self._positions()
      try:
        self._run(job)
      finally:
        with self.cv:
          self.running = None
          job.visitor.job = None
          self._positions()

  def _run(self, job: Job) -> None:
    v, spec = job.visitor, job.spec
    chunk_count = [0]
    t_start = time.perf_counter()

    def on_frames(start: int, batch: np.ndarray) -> None:
      for i, frame in enumerate(batch):
        v.send(struct.pack(">I", start + i) + jpeg(frame))
      chunk_count[0] += 1
      now = time.perf_counter()
      v.send({"type": "chunk", "chunk": chunk_count[0], "frames": start + len(batch),
              "total": spec.frames, "elapsed_s": now - t_start})

    try:
      result = self.engine.generate(spec, on_status=v.send, on_frames=on_frames, stop=job.stop)
    except Exception as e:  # pylint: disable=broad-except
      _log.exception("generation failed")
      v.send({"type": "error", "message": f"the generation failed: {type(e).__name__}: {e}"})
      return
    out = {"frames": result.count, "total": spec.frames, "seconds": result.seconds,
           "fps": result.fps, "first_chunk_s": result.first_chunk_s,
           "compile_s": result.compile_s, "setting": spec.setting, "variant": spec.variant}
    if result.count and not v.closed:  # (a closed tab downloads nothing)
      path = self.videos / f"{job.id}.mp4"
      try:
        self.engine.save_mp4(result, path)
        out["video"] = f"/video/{path.name}"
        self._saved.append(path)
        while len(self._saved) > KEEP_VIDEOS:
          self._saved.popleft().unlink(missing_ok=True)
      except OSError as e:
        out["video_error"] = str(e)
    v.send({"type": "stopped" if result.stopped else "done", **out})


def make_app(engine: Engine, videos: Path | None = None):
  """The aiohttp application (also what the tests serve)."""
  from aiohttp import WSMsgType, web  # pylint: disable=g-import-not-at-top
  own_videos = videos is None
  videos = Path(tempfile.mkdtemp(prefix="asd_jax_demo_")) if own_videos else Path(videos)
  app = web.Application()
  scheduler = Scheduler(engine, videos)

  async def index(_):
    return web.FileResponse(STATIC / "index.html")

  async def video(request):
    name = request.match_info["name"]
    path = videos / name
    if not name.endswith(".mp4") or "/" in name or not path.is_file():
      raise web.HTTPNotFound(text="no such video (only the last few are kept).")
    return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{name}"'})

  async def socket(request):
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    visitor = Visitor(ws, asyncio.get_running_loop())
    pump = asyncio.create_task(visitor.pump())
    visitor.send({"type": "hello", **engine.describe(),
                  "compiled": len(engine._compiled)})  # pylint: disable=protected-access
    try:
      async for msg in ws:
        if msg.type != WSMsgType.TEXT:
          continue
        try:
          data = json.loads(msg.data)
          kind = data.get("type")
        except (ValueError, AttributeError):
          visitor.send({"type": "error", "message": "the page sent a message it should not."})
          continue
        if kind == "start":
          if visitor.job is not None:
            visitor.send({"type": "error", "message": "a generation of yours is running or "
                                                      "queued; Stop it first."})
            continue
          try:
            spec = engine.validate(data)
          except InputError as e:
            visitor.send({"type": "error", "message": str(e)})
            continue
          visitor.job = Job(spec, visitor)
          scheduler.submit(visitor.job)
        elif kind == "stop" and visitor.job is not None:
          scheduler.cancel(visitor.job)
    finally:
      visitor.closed = True
      if visitor.job is not None:  # a closed tab cancels its work
        scheduler.cancel(visitor.job)
      visitor.outbox.put_nowait(None)
      await pump
    return ws

  async def on_cleanup(_):
    await asyncio.get_running_loop().run_in_executor(None, scheduler.close)
    if own_videos:
      shutil.rmtree(videos, ignore_errors=True)

  app.router.add_get("/", index)
  app.router.add_get("/ws", socket)
  app.router.add_get("/video/{name}", video)
  app.router.add_static("/static/", STATIC)
  app.on_cleanup.append(on_cleanup)
  return app


class Running:
  """A server on its own event loop in a background thread: `with Running(engine) as url: ...`."""

  def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0):
    self.engine, self.host, self.port = engine, host, port
    self.loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
    self.runner = None

  def __enter__(self) -> str:
    from aiohttp import web  # pylint: disable=g-import-not-at-top
    self._thread.start()

    async def start():
      self.runner = web.AppRunner(make_app(self.engine))
      await self.runner.setup()
      site = web.TCPSite(self.runner, self.host, self.port)
      await site.start()
      return site._server.sockets[0].getsockname()[1]  # pylint: disable=protected-access

    port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=60)
    self.url = f"http://{self.host}:{port}/"
    return self.url

  def __exit__(self, *exc):
    asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=120)
    self.loop.call_soon_threadsafe(self.loop.stop)
    self._thread.join(timeout=10)
