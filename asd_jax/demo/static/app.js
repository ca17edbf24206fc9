// The demo page: sends a request over the WebSocket, draws the frames it receives at the video's
// frame rate, and shows what the server reports. No build step: plain browser JavaScript.
"use strict";
const $ = (id) => document.getElementById(id);
let ws = null, info = null, frames = [], shown = 0, received = 0, player = null, running = false;
let startedAt = 0;

function message(text) { $("message").textContent = text || ""; }
function status(text) { $("status").textContent = text; }
function busy(on) {
  running = on;
  $("start").disabled = on;
  $("stop").disabled = !on;
}

function settingText(m) {
  const v = $("variant").value, s = $("setting").value;
  const fmt = (ts) => ts.map((t) => +t.toFixed(1)).join(", ");
  return `${s} (${v}): first chunk [${fmt(m.first)}], later chunks [${fmt(m.later)}]`;
}

function setup(m) {
  info = m;
  const toy = m.condition === "class";
  for (const id of ["prompt", "prompt-label"]) $(id).hidden = toy;
  for (const id of ["cls", "cls-label"]) $(id).hidden = !toy;
  if (toy) $("cls").innerHTML = m.classes.map((c, i) => `<option value="${i}">${c}</option>`).join("");
  $("setting").innerHTML = m.settings.map((s) => `<option>${s}</option>`).join("");
  $("setting").value = m.settings.includes("1*") ? "1*" : m.settings[0];
  $("variant").innerHTML = m.variants.map((s) => `<option>${s}</option>`).join("");
  const opts = m.frame_options;
  $("frames").value = opts[Math.min(opts.length - 1, 2)];
  $("frames-hint").textContent = `${opts[0]}, ${opts[1] ?? ""} ... ${opts[opts.length - 1]}` +
      ` (whole chunks; past ${m.cache_frames ?? "all"} latent frames the KV cache rolls)`;
  status(m.compiled ? "ready" : "ready (the first generation of each setting compiles first)");
}

function play() {
  // Draws the next received frame at the video's frame rate; waits when none has arrived yet.
  clearInterval(player);
  player = setInterval(() => {
    if (shown < frames.length && frames[shown]) {
      const c = $("video"), img = frames[shown];
      if (c.width !== img.width || c.height !== img.height) {
        c.width = img.width; c.height = img.height;
        const scale = Math.max(1, Math.floor(320 / img.height));  // small videos shown larger
        c.style.width = `${img.width * scale}px`;
      }
      c.getContext("2d").drawImage(img, 0, 0);
      shown += 1;
      $("frames-readout").textContent = `${received} received, ${shown} shown`;
    }
  }, 1000 / info.fps);
}

function start() {
  message("");
  const req = {type: "start", setting: $("setting").value, variant: $("variant").value,
               seed: $("seed").value, frames: $("frames").value};
  if (info.condition === "class") req.class = $("cls").value; else req.prompt = $("prompt").value;
  if (info.condition !== "class" && !req.prompt.trim()) { message("write a prompt first."); return; }
  frames = []; shown = 0; received = 0;
  for (const id of ["latency", "fps", "compile", "frames-readout"]) $(id).textContent = "-";
  $("download").hidden = true;
  ws.send(JSON.stringify(req));
  busy(true);
  status("sent");
  play();
}

function onJson(m) {
  switch (m.type) {
    case "hello": setup(m); break;
    case "queued":
      status(`waiting: position ${m.position} in the queue (${m.ahead} generation(s) ahead)`);
      break;
    case "compiling": status("compiling this setting (first use; later requests reuse it)..."); break;
    case "started":
      startedAt = performance.now();
      status("generating");
      $("setting-readout").textContent = settingText(m);
      $("compile").textContent = m.compile_s == null ? "reused" : `${m.compile_s.toFixed(1)} s`;
      break;
    case "chunk":
      status(`generating: chunk ${m.chunk}, ${m.frames} of ${m.total} frames`);
      break;
    case "done": case "stopped":
      busy(false);
      if (m.first_chunk_s != null) $("latency").textContent = `${m.first_chunk_s.toFixed(3)} s`;
      if (m.fps != null && m.frames) $("fps").textContent =
          `${m.fps.toFixed(1)} frames/s (${m.frames} frames in ${m.seconds.toFixed(2)} s)`;
      status(m.type === "done" ? `done: ${m.frames} frames` :
             `stopped after ${m.frames} of ${m.total} frames`);
      if (m.video) { $("download").href = m.video; $("download").hidden = false; }
      break;
    case "error":
      busy(false); status("ready"); message(m.message); break;
  }
}

async function onFrame(buf) {
  const index = new DataView(buf).getUint32(0);
  const bmp = await createImageBitmap(new Blob([buf.slice(4)], {type: "image/jpeg"}));
  frames[index] = bmp;
  received += 1;
  const secs = (performance.now() - startedAt) / 1000;
  if (received === 1) $("latency").textContent = `${secs.toFixed(3)} s (page)`;
  $("fps").textContent = `${(received / secs).toFixed(1)} frames/s (page, so far)`;
  $("frames-readout").textContent = `${received} received, ${shown} shown`;
}

function connect() {
  ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (e) => typeof e.data === "string" ? onJson(JSON.parse(e.data)) : onFrame(e.data);
  ws.onclose = () => { busy(false); status("disconnected: reload the page"); };
  ws.onerror = () => message("lost the connection to the demo server.");
}

$("start").onclick = start;
$("stop").onclick = () => { ws.send(JSON.stringify({type: "stop"})); status("stopping..."); };
connect();
