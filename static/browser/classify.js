// Where the answers come from on the static site that `python export.py --format web` writes: the exported
// model (model.onnx), run in this browser by onnxruntime-web's WebAssembly backend, on the digit that
// prepare.js makes of the pad, as digits.prepare_digit makes it on the server. Both run in a worker
// (worker.js), so the page keeps drawing while a drawing is read. Nothing leaves the page.
"use strict";

const classifier = {
  where: "The network runs in your browser (onnxruntime-web): no server, nothing you draw leaves this page.",
  photos: false, // prepare_digit's photo path (background, threshold) is not ported and measured in JavaScript
  worker: null,
  waiting: new Map(), // request id -> the promise's resolve and reject
  asked: 0,

  // The answer ({digit, confidence, probabilities, prepared, inside, ms}) for the pad's drawing, with inside (every
  // layer) if asked; throws an Error whose message is the line to show.
  classify(pad, photo, inside) {
    const image = pad.getContext("2d").getImageData(0, 0, pad.width, pad.height);
    const id = ++this.asked;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.worker.postMessage({ id, image, inside }, [image.data.buffer]);
    }).then(answer);
  },
};

function answer({ digit, logits, inside, ms }) {
  const most = Math.max(...logits);
  const exp = logits.map((z) => Math.exp(z - most));
  const sum = exp.reduce((a, b) => a + b);
  const probabilities = exp.map((e) => e / sum);
  const best = logits.indexOf(most);
  return { digit: best, confidence: probabilities[best], probabilities, prepared: pngOf(digit), inside, ms };
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

// The worker starts loading onnxruntime-web and the model as the page loads, so that the first drawing
// waits as little as possible.
try {
  classifier.worker = new Worker("worker.js");
  classifier.worker.onmessage = ({ data }) => {
    const { resolve, reject } = classifier.waiting.get(data.id);
    classifier.waiting.delete(data.id);
    if (data.error) reject(new Error(data.error));
    else resolve(data);
  };
} catch (err) { // a page opened from file:// may start no worker
  const reason = "this page cannot start its worker from a file: serve the folder, e.g. "
    + "python -m http.server --bind 127.0.0.1 -d web";
  classifier.classify = async () => { throw new Error(reason); };
}
