// Where the answers come from on the static site that `python export.py --format web` writes: the exported
// model (model.onnx) run in this browser by onnxruntime-web's WebAssembly backend, on the digit that
// prepare.js makes of the pad, as digits.prepare_digit makes it on the server. Nothing leaves the page.
"use strict";

const classifier = {
  where: "The network runs in your browser (onnxruntime-web): no server, nothing you draw leaves this page.",
  photos: false, // prepare_digit's photo path (background, threshold) is not ported and measured in JavaScript
  session: openModel(), // loading from the page's load on, so that the first drawing waits as little as possible

  async classify(pad) {
    let session;
    try {
      session = await (this.session ||= openModel());
    } catch (err) {
      this.session = null; // this drawing shows why; the next one tries again
      throw err;
    }
    const digit = prepareDrawing(pad.getContext("2d").getImageData(0, 0, pad.width, pad.height));
    if (!digit) throw new Error("no digit found: nothing stands out from the background");
    const pixels = Float32Array.from(digit, (v) => v / 255); // the model's input: [0, 1], white on black
    const output = await session.run({ pixels: new ort.Tensor("float32", pixels, [1, 1, 28, 28]) });
    const logits = Array.from(output.logits.data);
    const most = Math.max(...logits);
    const exp = logits.map((z) => Math.exp(z - most));
    const sum = exp.reduce((a, b) => a + b);
    const probabilities = exp.map((e) => e / sum);
    const best = logits.indexOf(most);
    return { digit: best, confidence: probabilities[best], probabilities, prepared: pngOf(digit) };
  },
};

// prepare.js, onnxruntime-web and the model, loaded once
async function openModel() {
  try {
    if (typeof prepareDrawing === "undefined") await load("prepare.js");
    if (typeof ort === "undefined") await load("ort.wasm.min.js");
    ort.env.wasm.wasmPaths = new URL("./", location.href).href; // this folder, never a CDN
    // Threads need cross-origin isolation (COOP and COEP headers), which python -m http.server and GitHub
    // Pages do not send; one image is far too small to split anyway.
    ort.env.wasm.numThreads = 1;
    return await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  } catch (err) {
    const how = location.protocol === "file:" ? "; a page opened as a file cannot load WebAssembly: " +
      "serve the folder, e.g. python -m http.server -d web" : "";
    throw new Error(`the model could not be loaded (${err.message || err})${how}`);
  }
}

function load(src) {
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = src;
    script.onload = resolve;
    script.onerror = () => reject(new Error(`${src} did not load`));
    document.head.appendChild(script);
  });
}

// 784 uint8 values -> a PNG data URL of the 28x28 digit, for #prepared
function pngOf(digit) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 28;
  const context = canvas.getContext("2d");
  const image = context.createImageData(28, 28);
  digit.forEach((v, i) => image.data.set([v, v, v, 255], 4 * i));
  context.putImageData(image, 0, 0);
  return canvas.toDataURL("image/png");
}

classifier.session.catch(() => {}); // a failure to load is shown at the first drawing, not as an uncaught error
