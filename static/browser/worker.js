// The static site's classifier, off the page's thread: prepare.js on the pad's pixels, then the model in
// onnxruntime-web's WebAssembly backend. classify.js sends {id, image}; the answer is {id, digit, logits, ms}
// or {id, error}. It starts loading the model as soon as the page starts it.
"use strict";

// onnxruntime-web's files in this folder, never a CDN. Its glue module comes as .js, not as its own .mjs: nginx's
// stock mime.types knows no .mjs and would send it as application/octet-stream, a type no browser runs.
const ORT = "ort.wasm.min.js";
const GLUE = "ort-wasm-simd-threaded.js";
const WASM = "ort-wasm-simd-threaded.wasm";
const MODEL = "model.onnx";
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
    return await ort.InferenceSession.create(MODEL, { executionProviders: ["wasm"] });
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
  for (const file of [ORT, GLUE, WASM, MODEL]) {
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

onmessage = async ({ data: { id, image } }) => {
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
    const output = await model.run({ pixels: new ort.Tensor("float32", pixels, [1, 1, 28, 28]) });
    const ms = { prepare, run: performance.now() - start };
    postMessage({ id, digit: Array.from(digit), logits: Array.from(output.logits.data), ms });
  } catch (err) {
    postMessage({ id, error: err.message || String(err) });
  }
};
