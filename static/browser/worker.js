// The static site's classifier, off the page's thread: prepare.js on the pad's pixels, then the model in
// onnxruntime-web's WebAssembly backend. classify.js sends {id, image}; the answer is {id, digit, logits, ms}
// or {id, error}. It starts loading the model as soon as the page starts it.
"use strict";

importScripts("prepare.js");
let session = open();
session.catch(() => {}); // a failure is answered to the first drawing, not left as an uncaught error

async function open() {
  try {
    if (typeof ort === "undefined") importScripts("ort.wasm.min.js");
    ort.env.wasm.wasmPaths = new URL("./", location.href).href; // this folder, never a CDN
    // Threads need cross-origin isolation (COOP and COEP headers), which python -m http.server and GitHub
    // Pages do not send; one image is far too small to split anyway.
    ort.env.wasm.numThreads = 1;
    return await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  } catch (err) {
    throw new Error(`the model could not be loaded (${err.message || err}); serve this folder over http`);
  }
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
