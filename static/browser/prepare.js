// digits.prepare_digit in JavaScript, for the drawing pad: the pad's RGBA pixels -> a 28x28 MNIST digit.
// The same steps in the same order, with PIL's and numpy's arithmetic where it matters (PIL's resampling
// filters, numpy's percentiles and rounding), so that tests/test_web_browser.py holds the two to a small tolerance.
// Only the branch a pad takes is ported: a pad is never under 64 px, so remove_background (for digit-sized
// images) is not; photos are read by the served demo only.
"use strict";

const WORK_SIZE = 256; // digits.py's constants
const INK_LEVEL = 0.25;
const MIN_CONTRAST = 0.12;

// --- numpy's and Python's arithmetic ------------------------------------------------------------

function percentiles(values, qs) {
  // numpy.percentile's default (linear between the two nearest ranks): the two ranks around each q, found
  // by selection rather than a full sort, which takes several times as long on a 256x256 image
  const a = Float64Array.from(values);
  return qs.map((q) => {
    const at = (q / 100) * (a.length - 1);
    const lo = Math.floor(at);
    const low = select(a, lo);
    if (lo + 1 >= a.length) return low;
    let high = Infinity; // the next rank: the least value above position lo once select has run
    for (let i = lo + 1; i < a.length; i++) high = Math.min(high, a[i]);
    return low + (high - low) * (at - lo);
  });
}

function select(a, k) {
  // The k-th smallest of a (Hoare's quickselect, in place): afterwards a[k] holds it, smaller ones before it
  let left = 0, right = a.length - 1;
  while (left < right) {
    const pivot = a[(left + right) >> 1];
    let i = left, j = right;
    while (i <= j) {
      while (a[i] < pivot) i++;
      while (a[j] > pivot) j--;
      if (i <= j) { const t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
    }
    if (k <= j) right = j;
    else if (k >= i) left = i;
    else break;
  }
  return a[k];
}

function roundHalfEven(x) {
  // Python's round() and numpy's round(): a tie goes to the even neighbour
  const floor = Math.floor(x), rest = x - floor;
  return rest > 0.5 || (rest === 0.5 && floor % 2 !== 0) ? floor + 1 : floor;
}

// --- PIL's resampling: a separable filter, horizontal pass first, as Resample.c computes it ----------

const FILTERS = {
  lanczos: {
    support: 3,
    at: (x) => (x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0),
  },
  bilinear: { support: 1, at: (x) => Math.max(0, 1 - Math.abs(x)) },
};

function sinc(x) {
  if (x === 0) return 1;
  x *= Math.PI;
  return Math.sin(x) / x;
}

function coefficients(inSize, outSize, filter) {
  // For each output pixel: the first input pixel it reads and the normalised weights
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = filter.support * filterscale;
  const taps = [];
  for (let i = 0; i < outSize; i++) {
    const centre = (i + 0.5) * scale;
    const lo = Math.max(Math.trunc(centre - support + 0.5), 0);
    const hi = Math.min(Math.trunc(centre + support + 0.5), inSize);
    const weights = [];
    let total = 0;
    for (let x = lo; x < hi; x++) {
      const w = filter.at((x - centre + 0.5) / filterscale);
      weights.push(w);
      total += w;
    }
    taps.push({ lo, weights: weights.map((w) => (total !== 0 ? w / total : w)) });
  }
  return taps;
}

function resize(src, w, h, outW, outH, filter) {
  // A float image (Float32Array, row-major) resized as PIL resizes mode "F"
  let image = src;
  if (outW !== w) {
    const taps = coefficients(w, outW, filter);
    const out = new Float32Array(outW * h);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < outW; x++) {
        const { lo, weights } = taps[x];
        let sum = 0;
        for (let k = 0; k < weights.length; k++) sum += image[y * w + lo + k] * weights[k];
        out[y * outW + x] = sum;
      }
    }
    image = out;
  }
  if (outH !== h) {
    const taps = coefficients(h, outH, filter);
    const out = new Float32Array(outW * outH);
    for (let y = 0; y < outH; y++) {
      const { lo, weights } = taps[y];
      for (let x = 0; x < outW; x++) {
        let sum = 0;
        for (let k = 0; k < weights.length; k++) sum += image[(lo + k) * outW + x] * weights[k];
        out[y * outW + x] = sum;
      }
    }
    image = out;
  }
  return image;
}

function rankFilter(src, w, h, size, rank) {
  // PIL's RankFilter (MedianFilter, MinFilter, MaxFilter) on 8-bit values: the rank-th smallest of each
  // size x size neighbourhood, the image's edge pixels repeated beyond it (Image.expand). A histogram of the
  // window slides along each row (Huang's method): a column in, a column out, instead of a sort per pixel.
  const half = size >> 1;
  const out = new Uint8Array(w * h);
  const column = (c) => Math.min(Math.max(c, 0), w - 1);
  const rows = new Int32Array(size);
  const counts = new Int32Array(256);
  for (let y = 0; y < h; y++) {
    for (let dy = -half; dy <= half; dy++) rows[dy + half] = Math.min(Math.max(y + dy, 0), h - 1) * w;
    counts.fill(0);
    for (const row of rows) {
      for (let dx = -half; dx <= half; dx++) counts[src[row + column(dx)]]++;
    }
    for (let x = 0; x < w; x++) {
      let v = 0;
      for (let seen = counts[0]; seen <= rank; seen += counts[++v]);
      out[y * w + x] = v;
      const leaving = column(x - half), entering = column(x + half + 1);
      for (const row of rows) {
        counts[src[row + leaving]]--;
        counts[src[row + entering]]++;
      }
    }
  }
  return out;
}

// --- the steps of prepare_digit --------------------------------------------------------------

function thumbnailSize(w, h) {
  // Image.thumbnail((WORK_SIZE, WORK_SIZE)): the side nearer the aspect ratio, floor or ceil
  const aspect = w / h;
  const pick = (n, error) => Math.max(error(Math.floor(n)) <= error(Math.ceil(n)) ? Math.floor(n) : Math.ceil(n), 1);
  if (aspect >= 1) return [WORK_SIZE, pick(WORK_SIZE / aspect, (n) => (n === 0 ? 0 : Math.abs(aspect - WORK_SIZE / n)))];
  return [pick(WORK_SIZE * aspect, (n) => Math.abs(aspect - n / WORK_SIZE)), WORK_SIZE];
}

function greyOnWhite(rgba, n) {
  // digits.grey: transparent pixels are white paper; PIL's L = 0.299 R + 0.587 G + 0.114 B
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const a = rgba[4 * i + 3] / 255;
    const lum = (0.299 * rgba[4 * i] + 0.587 * rgba[4 * i + 1] + 0.114 * rgba[4 * i + 2]) / 255;
    x[i] = a * lum + (1 - a);
  }
  return x;
}

function removeUnevenBackground(x, w, h, blocks = 8) {
  // digits.remove_uneven_background: each tile's 10th percentile, the darkest of its neighbours, smoothed,
  // spread back over the image bilinearly, and subtracted
  const edge = (size, i) => Math.trunc((i * size) / blocks);
  let grid = new Float32Array(blocks * blocks);
  for (let i = 0; i < blocks; i++) {
    for (let j = 0; j < blocks; j++) {
      const [r0, r1, c0, c1] = [edge(h, i), edge(h, i + 1), edge(w, j), edge(w, j + 1)];
      const tile = new Float64Array((r1 - r0) * (c1 - c0));
      for (let r = r0, n = 0; r < r1; r++) {
        for (let c = c0; c < c1; c++) tile[n++] = x[r * w + c];
      }
      [grid[i * blocks + j]] = percentiles(tile, [10]);
    }
  }
  const neighbours = (g, reduce) => {
    const out = new Float32Array(blocks * blocks);
    for (let i = 0; i < blocks; i++) {
      for (let j = 0; j < blocks; j++) {
        const values = [];
        for (let di = -1; di <= 1; di++) {
          for (let dj = -1; dj <= 1; dj++) {
            const r = Math.min(Math.max(i + di, 0), blocks - 1), c = Math.min(Math.max(j + dj, 0), blocks - 1);
            values.push(g[r * blocks + c]);
          }
        }
        out[i * blocks + j] = reduce(values);
      }
    }
    return out;
  };
  grid = neighbours(grid, (v) => Math.min(...v));
  if (grid.every((v) => v === 0)) return x; // nothing to subtract (a drawing on an empty pad): skip the spreading
  grid = neighbours(grid, (v) => v.reduce((a, b) => a + b) / v.length);
  const background = resize(grid, blocks, blocks, w, h, FILTERS.bilinear);
  for (let i = 0; i < x.length; i++) x[i] = Math.max(x[i] - background[i], 0);
  return x;
}

function otsu(x, bins = 64) {
  // digits.otsu: the level of [0, 1] that maximises the variance between the two sides
  const counts = new Float64Array(bins);
  for (let i = 0; i < x.length; i++) counts[Math.min(Math.floor(x[i] * bins), bins - 1)]++;
  let weight = 0, mean = 0;
  const weights = [], means = [];
  for (let b = 0; b < bins; b++) {
    weight += counts[b];
    mean += counts[b] * ((b + 0.5) / bins);
    weights.push(weight);
    means.push(mean);
  }
  let best = -1, level = 0;
  for (let b = 0; b < bins - 1; b++) {
    const below = weights[b], above = weight - weights[b];
    const between = (mean * below - means[b] * weight) ** 2 / Math.max(below * above, 1);
    if (between > best) { best = between; level = (b + 1) / bins; }
  }
  return level;
}

function fitToMnist(ink, w, h) {
  // digits.fit_to_mnist: into 20x20 keeping the aspect ratio, the centre of mass at the centre of 28x28
  const scale = 20 / Math.max(h, w);
  const sw = Math.max(1, roundHalfEven(w * scale)), sh = Math.max(1, roundHalfEven(h * scale));
  const small = resize(ink, w, h, sw, sh, FILTERS.lanczos).map((v) => Math.min(Math.max(v, 0), 1));
  let total = 0, cy = 0, cx = 0;
  for (let r = 0; r < sh; r++) {
    for (let c = 0; c < sw; c++) {
      const v = small[r * sw + c];
      total += v;
      cy += r * v;
      cx += c * v;
    }
  }
  let top = roundHalfEven(14 - cy / total), left = roundHalfEven(14 - cx / total);
  top = Math.min(Math.max(top, 0), 28 - sh);
  left = Math.min(Math.max(left, 0), 28 - sw);
  const out = new Float32Array(28 * 28);
  for (let r = 0; r < sh; r++) {
    for (let c = 0; c < sw; c++) out[(top + r) * 28 + left + c] = small[r * sw + c];
  }
  return out;
}

// The pad's pixels ({data, width, height}, as getImageData gives them) -> a 28x28 digit as 784 uint8 values,
// light on dark, or null when no ink stands out (prepare_digit's NoDigit).
function prepareDrawing(image) {
  let { width: w, height: h } = image;
  const n = () => w * h;
  let x = greyOnWhite(image.data, n());
  if (Math.max(w, h) > WORK_SIZE) {
    const [tw, th] = thumbnailSize(w, h);
    x = resize(x, w, h, tw, th, FILTERS.lanczos);
    [w, h] = [tw, th];
    for (let i = 0; i < n(); i++) x[i] = Math.min(Math.max(x[i], 0), 1);
  }
  const [low, middle, high] = percentiles(x, [1, 50, 99]);
  if (middle - low > high - middle) { // dark ink on light paper
    for (let i = 0; i < n(); i++) x[i] = 1 - x[i];
  }
  x = removeUnevenBackground(x, w, h);
  let top = 1e-6; // the median on 8-bit pixels, as prepare_digit runs it
  for (let i = 0; i < n(); i++) top = Math.max(top, x[i]);
  const eightBit = new Uint8Array(n());
  for (let i = 0; i < n(); i++) eightBit[i] = roundHalfEven((x[i] / top) * 255);
  const median = rankFilter(eightBit, w, h, 5, 12);
  for (let i = 0; i < n(); i++) x[i] = (median[i] / 255) * top;
  const [peak] = percentiles(x, [99.9]);
  if (peak < MIN_CONTRAST) return null;
  for (let i = 0; i < n(); i++) x[i] = Math.min(Math.max(x[i] / peak, 0), 1);
  const level = Math.max(INK_LEVEL, otsu(x));
  let mask = new Uint8Array(n());
  for (let i = 0; i < n(); i++) mask[i] = x[i] > level ? 1 : 0;
  const opened = rankFilter(rankFilter(mask, w, h, 3, 0), w, h, 3, 8); // a stray speck does not widen the box
  if (opened.some((v) => v > 0)) mask = opened;
  let r0 = h, r1 = -1, c0 = w, c1 = -1;
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      if (mask[r * w + c]) { r0 = Math.min(r0, r); r1 = Math.max(r1, r); c0 = Math.min(c0, c); c1 = Math.max(c1, c); }
    }
  }
  const iw = c1 - c0 + 1, ih = r1 - r0 + 1;
  const ink = new Float32Array(iw * ih);
  for (let r = 0; r < ih; r++) {
    for (let c = 0; c < iw; c++) {
      const v = x[(r0 + r) * w + c0 + c];
      ink[r * iw + c] = v > level / 2 ? v : 0;
    }
  }
  const digit = fitToMnist(ink, iw, ih);
  let most = 1e-6;
  for (const v of digit) most = Math.max(most, v);
  return Uint8Array.from(digit, (v) => roundHalfEven((v / most) * 255));
}
