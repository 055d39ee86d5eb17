// The static site's classifier, off the page's thread: prepare.js on the pad's pixels, then the model in
// onnxruntime-web's WebAssembly backend. classify.js sends {id, image, inside}; the answer is {id, digit, logits, ms},
// with inside when asked, every layer's output as demo.py's inside() gives it, or {id, error}. It starts loading the model
// as soon as the page starts it.
"use strict";

// onnxruntime-web's files in this folder, never a CDN. Its glue module comes as .js, not as its own .mjs: nginx's
// stock mime.types knows no .mjs and would send it as application/octet-stream, a type no browser runs.
const ORT = "ort.wasm.min.js";
const GLUE = "ort-wasm-simd-threaded.js";
const WASM = "ort-wasm-simd-threaded.wasm";
const MODEL = "model.onnx";
const INSIDE = "inside.json"; // export.py's: the model kind, conv1's filters, the occlusion's patch and stride
const here = (file) => new URL(file, location.href).href;

importScripts("prepare.js");
let session = open();
session.catch(() => {}); // a failure is answered to the first drawing, not left as an uncaught error

async function open() {
  try {
    if (typeof ort === "undefined") importScripts(ORT);
    ort.env.wasm.wasmPaths = { mjs: here(GLUE), wasm: here(WASM) };
    // Threads need cross-origin isolation (COOP and COEP headers), which python -m http.server and GitHub
    // Pages do not send; one image is far too small to split anyway.
    ort.env.wasm.numThreads = 1;
    const model = await ort.InferenceSession.create(MODEL, { executionProviders: ["wasm"] });
    const response = await fetch(INSIDE);
    if (!response.ok) throw new Error(`the server answered ${response.status} for ${here(INSIDE)}`);
    model.inside = await response.json();
    return model;
  } catch (err) {
    throw new Error(`the model could not be loaded: ${await diagnose(err)}`);
  }
}

// Why loading failed, as the server's answers tell it: a file it does not send, or a script sent with a type
// that browsers refuse to run; else onnxruntime's own error. (A .wasm of another type still loads, more slowly.)
async function diagnose(err) {
  if (location.protocol === "file:") {
    return "a page opened from a file cannot load WebAssembly: serve its folder, e.g. "
      + "python -m http.server --bind 127.0.0.1 -d web";
  }
  for (const file of [ORT, GLUE, WASM, MODEL, INSIDE]) {
    const response = await fetch(file, { cache: "no-store" }).catch(() => null);
    if (!response) return `${file} could not be fetched from ${location.host} (${err.message || err})`;
    response.body?.cancel(); // the answer's status and type are all we need, not its megabytes
    if (!response.ok) return `the server answered ${response.status} for ${here(file)}: is the file on the host?`;
    const type = (response.headers.get("Content-Type") || "none").split(";")[0];
    if (file.endsWith(".js") && !/javascript|ecmascript/i.test(type)) {
      return `the server sends ${file} as ${type}, and browsers run scripts only of a JavaScript type: `
        + "make it send .js files as text/javascript";
    }
  }
  return err.message || String(err);
}

onmessage = async ({ data: { id, image, inside: wanted } }) => {
  try {
    const model = await session.catch((err) => {
      session = open(); // this drawing says why; the next one tries again
      throw err;
    });
    let start = performance.now();
    const digit = prepareDrawing(image);
    if (!digit) throw new Error("no digit found: nothing stands out from the background");
    const prepare = performance.now() - start;
    const pixels = Float32Array.from(digit, (v) => v / 255); // the model's input: [0, 1], white on black
    start = performance.now();
    // One run for the digit and, for the occlusion map, the digit with each patch covered (model.occlusion's way)
    const { window, stride } = model.inside;
    const masks = wanted ? patches(window, stride) : []; // the digit alone when the views are folded
    const batch = new Float32Array((1 + masks.length) * 784);
    batch.set(pixels);
    masks.forEach((mask, k) => mask.forEach((covered, i) => { batch[(k + 1) * 784 + i] = covered ? 0 : pixels[i]; }));
    const output = await model.run({ pixels: new ort.Tensor("float32", batch, [1 + masks.length, 1, 28, 28]) });
    const logits = Array.from(output.logits.data.subarray(0, 10));
    const ms = { prepare, run: performance.now() - start };
    const answer = { id, digit: Array.from(digit), logits, ms };
    postMessage(wanted ? { ...answer, inside: inside(model, output, logits, masks) } : answer);
  } catch (err) {
    postMessage({ id, error: err.message || String(err) });
  }
};

// The patches of the occlusion map: one 0/1 mask of 784 pixels per window x window square, every stride pixels.
let cachedPatches = null;
function patches(window, stride) {
  if (cachedPatches) return cachedPatches;
  cachedPatches = [];
  for (let top = 0; top + window <= 28; top += stride) {
    for (let left = 0; left + window <= 28; left += stride) {
      const mask = new Uint8Array(784);
      for (let y = top; y < top + window; y++) mask.fill(1, y * 28 + left, y * 28 + left + window);
      cachedPatches.push(mask);
    }
  }
  return cachedPatches;
}

// The answer's "inside", as demo.py's inside() gives it: the digit's maps (the batch's first image), flat per
// channel; the occlusion map, each pixel the mean drop of the chosen digit's logit over the patches covering it.
function inside(model, output, logits, masks) {
  const best = logits.indexOf(Math.max(...logits));
  const sums = new Float64Array(784), counts = new Float64Array(784);
  masks.forEach((mask, k) => {
    const drop = logits[best] - output.logits.data[(k + 1) * 10 + best];
    mask.forEach((covered, i) => { if (covered) { sums[i] += drop; counts[i] += 1; } });
  });
  const first = (name, channels) => {
    const size = output[name].dims.slice(1).reduce((a, b) => a * b) / channels;
    return Array.from({ length: channels }, (_, c) => Array.from(output[name].data.subarray(c * size, (c + 1) * size)));
  };
  const view = { ...model.inside, logits, input_map: Array.from(sums, (sum, i) => sum / counts[i]) };
  if (view.model === "cnn") return { ...view, conv1: first("conv1", 10), conv2: first("conv2", 20) };
  return { ...view, hidden: first("hidden", 1)[0] };
}
