// Where the answers come from when `python demo.py` serves the page: POST /predict, where the server runs
// digits.prepare_digit and the model. demo.js draws and shows; it asks only classifier.classify(pad, photo).
// The folder `python export.py --format web` writes has browser/classify.js in this file's place instead.
"use strict";

// A phone photo can be 12 MB, over the server's 10 MB limit; 2048 px on the long side is still 8 times the
// 256 px that prepare_digit works at.
const MAX_PHOTO_SIDE = 2048;

const classifier = {
  where: "The network runs on the server that serves this page (python demo.py).",
  photos: true, // the server reads photos: prepare_digit's background removal and threshold are in Python

  // The answer ({digit, confidence, probabilities, prepared, inside}) for the pad's drawing, or for `photo` when it is
  // given, with inside (every layer) if asked; throws an Error whose message is the line to show.
  async classify(pad, photo, inside) {
    const image = photo ? await shrink(photo) : await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
    const form = new FormData();
    form.append("image", image, photo ? photo.name : "pad.png");
    let response;
    try {
      response = await fetch(inside ? "predict?inside=1" : "predict", { method: "POST", body: form });
    } catch (err) {
      throw new Error("the demo server cannot be reached: is `python demo.py` still running?");
    }
    // Every answer of demo.py is JSON; a proxy's or a crashed server's page is not, and is reported by its status.
    const json = (response.headers.get("content-type") || "").startsWith("application/json");
    const answer = json ? await response.json() : {};
    if (response.ok && json) return answer;
    throw new Error(answer.error || `the server answered ${response.status} ${response.statusText}`.trim());
  },
};

// A photo larger than MAX_PHOTO_SIDE, scaled down to it on a canvas and sent as a JPEG; any other file as it is
// (also one the browser cannot decode: the server then says what is wrong with it).
async function shrink(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file); // turned upright by its EXIF orientation, as the server would
  } catch (err) {
    return file;
  }
  const scale = MAX_PHOTO_SIDE / Math.max(bitmap.width, bitmap.height);
  if (scale >= 1) return file;
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff"; // transparent pixels are paper, as digits.grey reads them; a JPEG has no alpha
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.imageSmoothingQuality = "high";
  context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
}
