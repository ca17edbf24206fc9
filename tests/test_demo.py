"""`python -m asd_jax.demo`: the sampler's per-chunk stream, the demo's engine on tiny models, and
the page in a real (headless Chromium) browser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax.models import wan
from asd_jax.sampling import generate

SCHEDULES = dict(first_chunk_timesteps=(1000.0, 750.0), later_chunk_timesteps=(1000.0,))


@pytest.fixture(scope="module")
def tiny_dit():
  cfg = wan.WanConfig.preset("tiny", in_channels=4, out_channels=4, text_dim=32, dtype="float32",
                                num_layers=1, scan_layers=False)
  return wan.WanModel(cfg), wan.init_params(cfg, jax.random.key(0))


def test_chunk_latents_stream_out_in_order_and_equal_the_output(tiny_dit):
  module, params = tiny_dit
  ctx = jax.random.normal(jax.random.key(1), (1, 4, 32))
  noise = jax.random.normal(jax.random.key(2), (1, 9, 4, 4, 4))
  seen = []
  fn = jax.jit(lambda p, c, z, r: generate(
      module, p, c, z, rng=r, on_chunk_latents=lambda i, x: seen.append((int(i), np.asarray(x))),
      **SCHEDULES))
  out = np.asarray(fn(params, ctx, noise, jax.random.key(3)))
  assert [i for i, _ in seen] == [0, 1, 2]
  for i, x in seen:
    np.testing.assert_array_equal(x, out[:, 3 * i:3 * i + 3])
  plain = jax.jit(lambda p, c, z, r: generate(module, p, c, z, rng=r, **SCHEDULES))
  np.testing.assert_array_equal(out, plain(params, ctx, noise, jax.random.key(3)))


def test_an_exception_in_the_chunk_callback_stops_the_generation(tiny_dit):
  module, params = tiny_dit
  seen = []

  def stop_after_first(i, _):
    seen.append(int(i))
    raise RuntimeError("stop")

  fn = jax.jit(lambda p, c, z, r: generate(module, p, c, z, rng=r,
                                           on_chunk_latents=stop_after_first, **SCHEDULES))
  with pytest.raises(Exception, match="stop"):
    jax.block_until_ready(fn(params, jnp.zeros((1, 4, 32)), jnp.ones((1, 9, 4, 4, 4)),
                             jax.random.key(0)))
  assert seen == [0]


# ------------------------------------------------------------------------------------------------
# The engine and the server on a toy-world export of a tiny random student.

import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

from asd_jax.demo import engine as demo_engine  # noqa: E402

STALL_S = 600  # the longest a test waits for anything (a compile on a busy machine) before failing


@pytest.fixture(scope="module")
def toy_engine(tmp_path_factory):
  """A toy pipeline workdir holding only a student export (a tiny random Wan shaped for the toy
  world of configs/toy.py), loaded the way `python -m asd_jax.demo --toy=DIR` loads it."""
  from asd_jax.train.loop import export_generator
  workdir = tmp_path_factory.mktemp("toy")
  cfg = wan.WanConfig.preset("tiny", in_channels=4, out_channels=4, num_layers=1,
                             dtype="float32")
  export_generator(wan.init_params(cfg, jax.random.key(0)), cfg, workdir / "asd" / "export",
                   {"stage": "test"})
  return demo_engine.load_toy(workdir, max_latent_frames=18)


class Gate:
  """Holds the sampler inside the chunk callback of `hold_after` until opened: generation pauses
  mid-video (for a screenshot and a Stop) as it would on a slow model."""

  def __init__(self, eng, hold_after: int):
    self.eng, self.hold_after = eng, hold_after
    self.open, self.held = threading.Event(), threading.Event()
    self._orig = eng._on_latents

  def __enter__(self):
    def paced(i, x):
      self._orig(i, x)
      if int(i) >= self.hold_after:
        self.held.set()
        self.open.wait(STALL_S)
    self.eng._on_latents = paced
    return self

  def __exit__(self, *exc):
    self.open.set()
    self.eng._on_latents = self._orig


def test_settings_map_to_the_samplers_schedules():
  ts = (1000.0, 937.5, 833.3333333333334, 625.0)
  assert demo_engine.schedules(ts, "4", "prefix") == (ts, ts)
  assert demo_engine.schedules(ts, "1*", "prefix") == (ts, (1000.0,))
  assert demo_engine.schedules(ts, "2", "spread") == ((1000.0, 833.3333333333334),) * 2
  assert demo_engine.schedules(ts, "2*", "spread") == (ts, (1000.0, 833.3333333333334))
  for setting, variant, msg in (("5", "prefix", "unknown setting"), ("1*", "odd", "variant")):
    with pytest.raises(demo_engine.InputError, match=msg):
      demo_engine.schedules(ts, setting, variant)


def test_engine_streams_chunks_stops_and_reuses_its_programs(toy_engine, tmp_path):
  eng = toy_engine
  assert eng.frame_options() == [3, 6, 9, 12, 15, 18] and eng.cache_frames == 9
  for raw, msg in (({"class": 9}, "pick a class"), ({"class": 0, "frames": 7}, "frames must be"),
                   ({"class": 0, "frames": 6, "setting": "7"}, "unknown setting"),
                   ({"class": 0, "frames": 6, "seed": "x"}, "seed")):
    with pytest.raises(demo_engine.InputError, match=msg):
      eng.validate({"setting": "1*", **raw})
  # 18 latent frames > the 9 of the cache: the window rolls. (Every test here asks for 1* and 18
  # frames: one compile for the module.)
  spec = eng.validate({"class": 2, "setting": "1*", "variant": "prefix", "seed": 5, "frames": 18})
  got, status = [], []
  result = eng.generate(spec, on_status=status.append, on_frames=lambda i, f: got.append((i, f)))
  assert [i for i, _ in got] == [0, 3, 6, 9, 12, 15] and result.count == 18
  assert not result.stopped
  assert all(f.shape == (3, 64, 64, 3) and f.dtype == np.uint8 for _, f in got)
  assert [m["type"] for m in status][-1] == "started"
  assert result.first_chunk_s is not None and result.fps > 0
  # The frames are the toy rendering of the sampler's own output for this seed and class.
  from asd_jax import sample
  from asd_jax.toy.ablation import render_frames
  noise, rk = sample.video_noise(jax.random.fold_in(jax.random.key(5), 0), (1, 18, 8, 8, 4))
  x = jax.jit(lambda p, c, z, r: generate(
      eng.dit, p, c, z, rng=r, first_chunk_timesteps=spec.first,
      later_chunk_timesteps=spec.later, cache_frames=9))(
          eng.dit_params, jnp.asarray(eng.world.text[2][None]), noise, rk)
  want = render_frames(eng.world, np.asarray(x), scale=8)
  assert np.abs(np.concatenate([f for _, f in got]).astype(int) - want).max() <= 1
  # The second request with this setting and length compiles nothing.
  status.clear()
  again = eng.generate(spec, on_status=status.append)
  assert "compiling" not in [m["type"] for m in status] and again.compile_s is None
  np.testing.assert_array_equal(np.concatenate(again.frames), np.concatenate(result.frames))
  # Stop after the first chunk: the sampler, held in the next chunk's callback, ends there.
  stop = threading.Event()
  with Gate(eng, hold_after=1) as gate:
    def stop_then_release(i, f):
      stop.set()
      gate.open.set()
    stopped = eng.generate(spec, on_frames=stop_then_release, stop=stop)
  assert stopped.stopped and stopped.count < 18
  assert eng.save_mp4(result, tmp_path / "video.mp4") == 18


# A minimal Chrome DevTools Protocol client (no browser driver to install: Debian's chromium is
# driven directly over its debugging WebSocket).

def find_chromium() -> str | None:
  for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
    path = shutil.which(name)
    if path:
      return path
  return None


class Browser:
  def __init__(self, tmp: Path):
    exe = find_chromium()
    if exe is None:
      pytest.skip("no Chromium installed (Debian: apt-get install chromium; .ci/run installs it)")
    self.proc = subprocess.Popen(
        [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--remote-debugging-port=0", f"--user-data-dir={tmp / 'profile'}",
         "--window-size=1100,1100", "about:blank"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    self.port = None
    lines = []
    while time.monotonic() < deadline:
      line = self.proc.stderr.readline()
      if not line:
        break
      lines.append(line)
      m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
      if m:
        self.port = int(m.group(1))
        break
    if self.port is None:
      self.close()
      pytest.fail("Chromium did not start:\n" + "".join(lines[-20:]))
    threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained

  def page_ws(self) -> str:
    pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list",
                                              timeout=30).read())
    return next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")

  def close(self):
    self.proc.terminate()
    try:
      self.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      self.proc.kill()


class Page:
  def __init__(self, ws):
    self.ws, self.n = ws, 0

  async def send(self, method, **params):
    self.n += 1
    await self.ws.send_json({"id": self.n, "method": method, "params": params})
    while True:
      msg = await asyncio.wait_for(self.ws.receive_json(), STALL_S)
      if msg.get("id") == self.n:
        if "error" in msg:
          raise RuntimeError(f"{method}: {msg['error']}")
        return msg["result"]

  async def eval(self, expr):
    r = await self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
    if "exceptionDetails" in r:
      raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
    return r["result"].get("value")

  async def wait(self, expr, timeout=STALL_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # (the page may still be loading: not there yet = false)
      value = await self.eval(f"(() => {{ try {{ return ({expr}); }} catch (e) {{ return false; }} }})()")
      if value:
        return value
      await asyncio.sleep(0.05)
    state = await self.eval("document.body && document.body.innerText")
    raise AssertionError(f"timed out waiting for {expr}; page: {state}")

  async def text(self, id_):
    return await self.eval(f"document.getElementById({id_!r}).textContent")

  async def screenshot(self, path: Path):
    import base64
    r = await self.send("Page.captureScreenshot", format="png")
    path.write_bytes(base64.b64decode(r["data"]))
    return path


def keep_artifact(path: Path) -> Path:
  """Copies a test artifact to $ASD_JAX_ARTIFACTS when set (it stays in the test's tmp dir)."""
  dest = os.environ.get("ASD_JAX_ARTIFACTS")
  if dest:
    Path(dest).mkdir(parents=True, exist_ok=True)
    shutil.copy(path, Path(dest) / path.name)
  return path


# Reads the canvas: the spread of its pixel values (0 for a blank or uniform picture).
CANVAS_SPREAD = """(() => { const c = document.getElementById('video');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let s = 0, s2 = 0, n = 0;
  for (let i = 0; i < d.length; i += 4) for (let k = 0; k < 3; k++) { s += d[i + k]; s2 += d[i + k] ** 2; n++; }
  return Math.sqrt(s2 / n - (s / n) ** 2); })()"""


async def _drive(url, browser, eng, tmp_path, condition):
  import aiohttp
  async with aiohttp.ClientSession() as session:
    async with session.ws_connect(browser.page_ws(), max_msg_size=0) as ws:
      page = Page(ws)
      await page.send("Page.enable")
      await page.send("Page.navigate", url=url)
      await page.wait("document.getElementById('status').textContent.startsWith('ready')")

      async def start(**fields):
        for k, v in fields.items():
          await page.eval(f"(() => {{ const e = document.getElementById({k!r}); "
                          f"if (e.tagName === 'SELECT' && ![...e.options].some(o => o.value === "
                          f"{json.dumps(str(v))})) e.add(new Option({json.dumps(str(v))})); "
                          f"e.value = {json.dumps(str(v))}; }})()")
        await page.eval("document.getElementById('message').textContent = ''")
        await page.eval("document.getElementById('start').click()")

      # Bad input gets its message on the page and leaves the page ready for the next request.
      base = {"setting": "1*", "frames": eng.frame_options()[1]}
      base.update({"prompt": "a red cat"} if condition == "prompt" else {"cls": 0})
      bad = [({"frames": 7}, "frames must be one of"), ({"setting": "5*"}, "unknown setting")]
      bad += ([({"prompt": "   "}, "write a prompt")] if condition == "prompt" else
              [({"cls": 17}, "pick a class")])
      for fields, msg in bad:
        await start(**{**base, **fields})
        got = await page.wait("document.getElementById('message').textContent")
        assert msg in got, got
        assert not await page.eval("document.getElementById('start').disabled")

      # A generation that streams: held after two chunks, mid-video.
      frames = eng.frame_options()[-1]
      per_chunk = eng.video_frames(eng.chunk_frames) if condition == "toy" else None
      with Gate(eng, hold_after=1) as gate:
        await start(**{**base, "frames": frames})
        await page.wait("document.getElementById('frames-readout').textContent.includes('shown')"
                        " && !document.getElementById('frames-readout').textContent"
                        ".startsWith('0 shown')", timeout=STALL_S)
        await page.wait("parseInt(document.getElementById('frames-readout').textContent) >= "
                        f"{eng.video_frames(2 * eng.chunk_frames) if per_chunk is None else 2 * per_chunk}")
        assert gate.held.is_set() and not gate.open.is_set()
        await page.wait("!document.getElementById('frames-readout').textContent"
                        ".includes(' 0 shown') && !/ [01] shown/.test("
                        "document.getElementById('frames-readout').textContent)")
        spread = await page.eval(CANVAS_SPREAD)
        assert spread > 2.0, f"the frames drawn on the page are blank (pixel spread {spread})"
        assert "s (page)" in await page.text("latency")
        assert "frames/s" in await page.text("fps")
        assert "1*" in await page.text("setting-readout")
        shot = keep_artifact(await page.screenshot(tmp_path / f"demo_{condition}_streaming.png"))
        # Stop: the sampler ends at its next chunk.
        await page.eval("document.getElementById('stop').click()")
        await asyncio.sleep(0.2)
        gate.open.set()
        await page.wait("document.getElementById('status').textContent.startsWith('stopped')")
      status = await page.text("status")
      n, total = map(int, re.search(r"after (\d+) of (\d+)", status).groups())
      assert 0 < n < total == frames
      assert not await page.eval("document.getElementById('start').disabled")

      # The same setting again runs to the end on the compiled program; read-outs from the server.
      await start(**{**base, "frames": frames})
      await page.wait("document.getElementById('status').textContent.startsWith('done')")
      assert await page.text("compile") == "reused"
      assert re.fullmatch(r"\d+\.\d{3} s", await page.text("latency"))
      assert re.match(r"[\d.]+ frames/s \(\d+ frames in", await page.text("fps"))
      href = await page.eval("document.getElementById('download').href")
      assert not await page.eval("document.getElementById('download').hidden")
      video = urllib.request.urlopen(href, timeout=30).read()
      assert video[4:8] == b"ftyp" and len(video) > 1024
      return shot


def run_browser(eng, tmp_path, condition):
  pytest.importorskip("aiohttp", reason="the demo extra is not installed (pip install -e .[demo])")
  from asd_jax.demo.server import Running
  browser = Browser(tmp_path)
  try:
    with Running(eng) as url:
      assert url.startswith("http://127.0.0.1:")
      return asyncio.run(_drive(url, browser, eng, tmp_path, condition))
  finally:
    browser.close()


def test_page_in_a_browser_with_the_toy_world(toy_engine, tmp_path):
  shot = run_browser(toy_engine, tmp_path, "toy")
  assert shot.read_bytes()[:4] == b"\x89PNG"


# The queue, seen from two visitors' sockets (no browser needed).

def test_one_generation_at_a_time_with_a_queue_and_closed_tabs_cancel(toy_engine):
  aiohttp = pytest.importorskip("aiohttp", reason="the demo extra is not installed")
  from asd_jax.demo.server import Running
  eng = toy_engine
  req = {"type": "start", "class": 1, "setting": "1*", "variant": "prefix", "seed": 0,
         "frames": eng.frame_options()[-1]}

  inbox = {}

  async def read(ws):  # every socket is read all the time, as a browser does (pings answered)
    async for msg in ws:
      if msg.type == aiohttp.WSMsgType.TEXT:
        await inbox[ws].put(json.loads(msg.data))

  async def until(ws, kind):
    while True:
      msg = await asyncio.wait_for(inbox[ws].get(), STALL_S)
      if msg["type"] == kind:
        return msg

  async def main(url):
    async with aiohttp.ClientSession() as s:
      first = await s.ws_connect(url + "ws")
      second = await s.ws_connect(url + "ws")
      readers = []
      for ws in (first, second):
        inbox[ws] = asyncio.Queue()
        readers.append(asyncio.create_task(read(ws)))
      hello = await until(second, "hello")
      assert hello["condition"] == "class" and hello["fps"] == demo_engine.TOY_FPS
      await first.send_str(json.dumps(req))
      await until(first, "started")
      while not gate.held.is_set():
        await asyncio.sleep(0.02)
      await second.send_str(json.dumps(req))
      queued = await until(second, "queued")
      assert (queued["position"], queued["ahead"]) == (1, 1)
      await second.send_str(json.dumps(req))
      assert "Stop it first" in (await until(second, "error"))["message"]
      await first.close()  # the tab closes: its generation is cancelled, the next one starts
      gate.open.set()
      done = await until(second, "done")
      assert done["frames"] == req["frames"]
      await second.close()
      await asyncio.gather(*readers)

  with Gate(eng, hold_after=1) as gate, Running(eng) as url:
    asyncio.run(main(url))


# The real models' path: a converted release of tiny random parts (tests/tiny_parts.py), a prompt,
# the umT5 context and the streaming VAE decode.

@pytest.fixture(scope="module")
def wan_engine(tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  pytest.importorskip("sentencepiece")
  import tiny_parts
  from asd_jax.demo.__main__ import build_engine, parser
  model_dir = tiny_parts.model_dir(tmp_path_factory.mktemp("parts"))
  args = parser().parse_args([f"--model_dir={model_dir}", "--height=32", "--width=48",
                              "--max_frames=33", "--dtype=float32"])
  return build_engine(args)


@pytest.mark.slow
def test_page_in_a_browser_with_a_converted_release(wan_engine, tmp_path):
  eng = wan_engine
  assert eng.frame_options() == [9, 21, 33] and eng.frame_size() == (32, 48)
  shot = run_browser(eng, tmp_path, "prompt")
  assert shot.read_bytes()[:4] == b"\x89PNG"


def test_cli_refuses_impossible_flags_before_loading(capsys):
  from asd_jax import cli
  from asd_jax.demo.__main__ import main
  for argv, msg in (([], "either --model_dir"), (["--toy=a", "--model_dir=b"], "either"),
                    (["--toy=a", "--port=0"], "--port"), (["--toy=a", "--sink_frames=2"], "sink"),
                    (["--toy=a", "--cache_frames=1"], "--cache_frames")):
    assert cli.run(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err, err
  assert cli.run(main, ["--toy=/nonexistent/toy"]) == 1
  assert "no toy export" in capsys.readouterr().err
