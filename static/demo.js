// The drawing pad, the live answer and the photo upload. No framework: the page is small enough to read.
// This file draws and shows; where the answers come from is classify.js's `classifier` (loaded before it).
"use strict";

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d", { willReadFrequently: true });  // the browser classifier reads its pixels
const prediction = document.getElementById("prediction");
const confidence = document.getElementById("confidence");
const prepared = document.getElementById("prepared");
const bars = document.getElementById("bars");
const message = document.getElementById("message");
const hint = document.getElementById("hint");
const drop = document.getElementById("drop");
document.getElementById("where").textContent = classifier.where;

// MNIST's strokes are about 2.5 px thick on a digit 20 px tall. A digit drawn to fill most of the pad
// keeps that ratio with a pen a twelfth of the pad wide.
const PEN_SHARE = 1 / 12;

// As many canvas pixels as screen pixels, so strokes stay sharp on a phone; the server shrinks it anyway.
function fitPad() {
  const side = Math.round(pad.getBoundingClientRect().width * (window.devicePixelRatio || 1));
  if (side > 0 && side !== pad.width) { pad.width = pad.height = side; }
}
fitPad();
window.addEventListener("resize", () => { if (empty) fitPad(); });  // resizing a canvas wipes it

let inFlight = false; // at most one request at a time: while one runs, later strokes only mark the pad dirty
let dirty = false;
let generation = 0;   // bumped by Clear, so that an answer to an older picture is dropped
let empty = true;
let photo = null;     // an uploaded file shown on the pad: it, not the pad, is what gets classified
let last = null;      // the previous point of the stroke being drawn

for (let d = 0; d < 10; d++) {
  const li = document.createElement("li");
  li.innerHTML = `<span class="digit">${d}</span><span class="track"><span class="fill"></span></span>` +
                 `<span class="pct"></span>`;
  bars.appendChild(li);
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}

function stroke(from, to) {
  ctx.strokeStyle = "#1d1b2e";
  ctx.lineWidth = pad.width * PEN_SHARE;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(...from);
  ctx.lineTo(...to);
  ctx.stroke();
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  if (photo) clearPad();  // drawing after a photo starts a new digit
  pad.setPointerCapture(event.pointerId);
  last = point(event);
  stroke(last, last);  // a tap leaves a dot
  empty = false;
  hint.hidden = true;
  changed();
});

pad.addEventListener("pointermove", (event) => {
  if (!last) return;
  // Coalesced events are the points the browser merged into this one: a fast stroke stays smooth.
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) {
    const p = point(e);
    stroke(last, p);
    last = p;
  }
  changed();
});

for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, () => {
    if (!last) return;
    last = null;
    changed();
  });
}

function changed() {
  dirty = true;
  prediction.setAttribute("aria-busy", "true");
  if (!inFlight) send();
}

async function send() {
  dirty = false;
  inFlight = true;
  const asked = generation;
  const started = performance.now();
  try {
    // classify.js: the server's, or the browser's; every layer only while the views are open
    const answer = await classifier.classify(pad, photo, insideBox.open);
    if (asked === generation) {
      show(answer);
      // the time of this update, from the pad's pixels to every view drawn: for people and for the benchmark
      prediction.dataset.ms = (performance.now() - started).toFixed(1);
    }
  } catch (err) {
    if (asked === generation) showError(err.message);
  } finally {
    inFlight = false;
    if (dirty) send();
    else prediction.setAttribute("aria-busy", "false");
  }
}

function show(answer) {
  prediction.textContent = answer.digit;
  prediction.dataset.digit = answer.digit;
  confidence.textContent = `${(answer.confidence * 100).toFixed(1)}% sure`;
  prepared.src = answer.prepared;
  prepared.classList.add("shown");
  message.textContent = "";
  setBars(answer.probabilities, answer.digit);
  showInside(answer.inside, answer.probabilities);
}

function showError(text) {
  prediction.textContent = "?";
  prediction.dataset.digit = "";
  confidence.innerHTML = "&nbsp;";
  prepared.classList.remove("shown");
  message.textContent = text.charAt(0).toUpperCase() + text.slice(1);
  setBars(null);
  showInside(null);
}

function setBars(probabilities, best) {
  bars.querySelectorAll("li").forEach((li, d) => {
    const p = probabilities ? probabilities[d] : 0;
    li.style.setProperty("--p", p.toFixed(4));  // the style draws the bar across, or upwards on a phone
    li.querySelector(".pct").textContent = probabilities ? `${Math.round(p * 100)}%` : "";
    li.classList.toggle("best", d === best);
  });
}

function clearPad() {
  generation++;
  dirty = false;
  empty = true;
  photo = null;
  last = null;
  ctx.clearRect(0, 0, pad.width, pad.height);
  fitPad();
  hint.hidden = false;
  prediction.textContent = "–";
  prediction.dataset.digit = "";
  prediction.setAttribute("aria-busy", inFlight ? "true" : "false");
  confidence.innerHTML = "&nbsp;";
  prepared.classList.remove("shown");
  prepared.removeAttribute("src");
  message.textContent = "";
  setBars(null);
  showInside(null);
}

document.getElementById("clear").addEventListener("click", clearPad);

// --- inside the network: every layer's output for this digit, from the answer's "inside" ---------------------
// The server sends it (POST /predict?inside=1, demo.inside), the static page's worker computes it with the
// exported model: {model, logits, input_map, window, stride} and conv1, conv2, filters (CNN) or hidden (FCNN).

const views = document.getElementById("views");
const insideBox = document.getElementById("inside");
const EMPTY = views.innerHTML;
// On a phone the views start folded, so that the pad stays on the screen under the answer.
if (window.matchMedia("(max-width: 640px)").matches) insideBox.open = false;
let builtFor = null; // the model kind whose views are in the page, so they are built once, then only repainted
// Folded views are neither asked for nor drawn (a phone pays nothing for them while drawing); opened, they ask
// for the digit on the pad again.
insideBox.addEventListener("toggle", () => {
  if (insideBox.open && !empty) changed();
});

// One view: a title and a sentence saying what it shows, then `count` canvases of w x h pixels, each with
// data-layer and data-channel, which tests and people use to find a map.
function addView(layer, title, sentence, count, w, h) {
  const figure = document.createElement("figure");
  figure.className = `view view-${layer}`;
  const caption = document.createElement("figcaption");
  const strong = document.createElement("strong");
  strong.textContent = title;
  caption.append(strong, " ", sentence);
  const maps = document.createElement("div");
  maps.className = "maps";
  for (let c = 0; c < count; c++) {
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    canvas.dataset.layer = layer;
    canvas.dataset.channel = c;
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", count > 1 ? `${title}: ${c + 1} of ${count}` : title);
    maps.appendChild(canvas);
  }
  figure.append(caption, maps);
  views.appendChild(figure);
  return figure;
}

function buildViews(inside) {
  views.textContent = "";
  const patch = `${inside.window} × ${inside.window}`;
  addView("input-map", "What the answer rests on.", `Each ${patch} patch of the 28 × 28 digit was covered ` +
    `with paper in turn: red pixels raised the chosen digit's score, blue ones lowered it.`, 1, 28, 28);
  if (inside.model === "cnn") {
    addView("conv1", "Layer 1: 10 feature maps, 12 × 12.", "Each of the first layer's 10 filters slides over " +
      "the digit and lights up where it finds its pattern; pooling keeps the strongest of each 2 × 2.", 10, 12, 12);
    addView("conv2", "Layer 2: 20 feature maps, 4 × 4.", "The second layer combines those maps and compresses " +
      "the digit into 20 small features: these 320 numbers are all the last layer reads.", 20, 4, 4);
  } else {
    const units = inside.hidden.length;
    const note = document.createElement("p");
    note.className = "no-maps";
    note.textContent = "This is the fully connected network: it has no feature maps and no filters, because " +
      `each of its ${units} hidden units weighs all 784 pixels at once.`;
    views.appendChild(note);
    addView("hidden", `Its hidden layer: ${units} units.`, "One square per unit, in order, after ReLU.",
      1, 16, Math.ceil(units / 16));
  }
  const scores = document.createElement("figure");
  scores.className = "view view-logits";
  scores.innerHTML = "<figcaption><strong>The ten scores (logits).</strong> The last layer gives one score per " +
    "digit; softmax turns the scores into the probabilities above.</figcaption><ol class=\"logits\"></ol>";
  for (let d = 0; d < 10; d++) {
    const li = document.createElement("li");
    li.dataset.layer = "logits";
    li.dataset.channel = d;
    li.innerHTML = `<span class="digit">${d}</span><span class="logit"></span><span class="prob"></span>`;
    scores.querySelector("ol").appendChild(li);
  }
  views.appendChild(scores);
  if (inside.model === "cnn") {
    addView("filters", "Layer 1's 10 filters, 5 × 5.", "The weights it learned in training: where a filter is " +
      "red, ink raises its map; where blue, ink lowers it.", 10, 5, 5);
  }
  builtFor = inside.model;
}

// One map on its canvas. Activations (after ReLU, never below 0) are grey: black 0, white `scale`. Signed values
// (weights, the input map) are red above 0 and blue below, white at 0. The scale is written on the canvas.
function paint(canvas, values, scale, signed) {
  const context = canvas.getContext("2d");
  const image = context.createImageData(canvas.width, canvas.height);
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    const a = Math.min(255, Math.round((255 * Math.abs(v)) / scale));
    const rgb = !signed ? [a, a, a] : v >= 0 ? [255, 255 - a, 255 - a] : [255 - a, 255 - a, 255];
    image.data.set([...rgb, 255], 4 * i);
  }
  context.putImageData(image, 0, 0);
  canvas.dataset.scale = scale;
}

// The largest |value| of a layer's maps, so one scale serves all of them (1 when all are 0).
function scaleOf(maps) {
  let most = 0;
  for (const map of maps) for (const v of map) most = Math.max(most, Math.abs(v));
  return most || 1;
}

function paintLayer(layer, maps, signed) {
  const scale = scaleOf(maps);
  views.querySelectorAll(`canvas[data-layer="${layer}"]`).forEach((canvas, c) => paint(canvas, maps[c], scale, signed));
}

function showInside(inside, probabilities) {
  if (!inside) {
    views.innerHTML = EMPTY;
    builtFor = null;
    return;
  }
  if (builtFor !== inside.model) buildViews(inside);
  paintLayer("input-map", [inside.input_map], true);
  if (inside.model === "cnn") {
    paintLayer("conv1", inside.conv1, false);
    paintLayer("conv2", inside.conv2, false);
    paintLayer("filters", inside.filters, true);
  } else {
    paintLayer("hidden", [inside.hidden], false);
  }
  views.querySelectorAll('li[data-layer="logits"]').forEach((li, d) => {
    li.dataset.value = inside.logits[d];
    li.querySelector(".logit").textContent = inside.logits[d].toFixed(2);
    li.querySelector(".prob").textContent = `${(probabilities[d] * 100).toFixed(1)}%`;
  });
}

// --- photos: the upload button, or a file dropped anywhere on the page -------------------------

function classifyPhoto(file) {
  if (!file || !classifier.photos) return;
  clearPad();
  photo = file;
  empty = false;  // the pad shows the photo now: a resize must not wipe it while its answer stays
  hint.hidden = true;
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {  // show the photo fitted in the pad; the classifier reads the file itself
    const scale = Math.min(pad.width / img.width, pad.height / img.height);
    const w = img.width * scale, h = img.height * scale;
    if (photo === file) ctx.drawImage(img, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    URL.revokeObjectURL(url);
  };
  img.onerror = () => URL.revokeObjectURL(url);
  img.src = url;
  changed();
}

if (!classifier.photos) {  // this page reads drawings only, and says so where it offers photos elsewhere
  document.getElementById("photos").textContent = "Photos are read by the served demo (python demo.py), not here.";
  document.querySelector(".upload-button").hidden = true;
}

const upload = document.getElementById("upload");
upload.addEventListener("change", () => {
  classifyPhoto(upload.files[0]);
  upload.value = "";  // choosing the same file again still fires change
});

let dragDepth = 0;  // dragenter/dragleave fire for every child element crossed
window.addEventListener("dragenter", (event) => {
  event.preventDefault();
  dragDepth++;
  drop.hidden = !classifier.photos;
});
window.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; drop.hidden = true; } });
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  drop.hidden = true;
  classifyPhoto(event.dataTransfer.files[0]);
});

setBars(null);
