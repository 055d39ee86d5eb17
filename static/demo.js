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
  try {
    const answer = await classifier.classify(pad, photo);  // classify.js: the server's, or the browser's
    if (asked === generation) show(answer);
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
}

function showError(text) {
  prediction.textContent = "?";
  prediction.dataset.digit = "";
  confidence.innerHTML = "&nbsp;";
  prepared.classList.remove("shown");
  message.textContent = text.charAt(0).toUpperCase() + text.slice(1);
  setBars(null);
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
}

document.getElementById("clear").addEventListener("click", clearPad);

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
