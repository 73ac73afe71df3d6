// Image preprocessing throughput: 1024x768 JPEG bytes → BLIP-2 pixel values (224x224 float32,
// PIL-exact bicubic, CLIP normalization) through BlipImageProcessor, batch 1 and batch 32, against
// sharp alone resizing the same bytes to raw 224x224 RGB (its own cubic kernel, with JPEG
// shrink-on-load: not PIL's pixels, but the fastest thing one could do with the same library).
//
//   npx tsx bench/processor.ts [--runs 40] [--batch-runs 5] [--device cpu]
//
// Prints one JSON line per measurement. Single-image lines run the calls one after another (the
// latency of one request); batch lines send 32 images in one call (BlipImageProcessor) or 32
// concurrent sharp pipelines (baseline).
import * as os from 'node:os';

import sharp from 'sharp';

import { BlipImageProcessor } from '../lib';

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

const runs = Number(arg('runs', '40'));
const batchRuns = Number(arg('batch-runs', '5'));
const device = arg('device', 'cpu');
const BATCH = 32;

/** A photo-like 1024x768 JPEG (smooth gradients, edges and noise), quality 90, 4:2:0. */
async function makeJpeg(): Promise<Buffer> {
  const width = 1024;
  const height = 768;
  const rgb = Buffer.alloc(width * height * 3);
  let seed = 12345;
  const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 16) / 65536;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 3;
      const disc = (x - 600) ** 2 + (y - 300) ** 2 < 180 ** 2;
      const noise = (rand() - 0.5) * 24;
      rgb[i] = Math.max(0, Math.min(255, (disc ? 220 : (x / width) * 200) + noise));
      rgb[i + 1] = Math.max(0, Math.min(255, (disc ? 60 : (y / height) * 180) + noise));
      rgb[i + 2] = Math.max(0, Math.min(255, ((x + y) % 256) * 0.5 + 60 + noise));
    }
  }
  return sharp(rgb, { raw: { width, height, channels: 3 } }).jpeg({ quality: 90 }).toBuffer();
}

async function time(fn: () => Promise<void>, repeat: number): Promise<number> {
  const start = process.hrtime.bigint();
  for (let i = 0; i < repeat; i++) await fn();
  return Number(process.hrtime.bigint() - start) / 1e9;
}

function report(variant: string, batch: number, calls: number, seconds: number, extra: Record<string, unknown> = {}): void {
  const images = batch * calls;
  console.log(JSON.stringify({
    bench: 'processor', variant, batch, images, seconds: +seconds.toFixed(4),
    imagesPerSecond: +(images / seconds).toFixed(1), msPerImage: +((seconds * 1000) / images).toFixed(3), ...extra,
  }));
}

async function main(): Promise<void> {
  const jpeg = await makeJpeg();
  const ip = new BlipImageProcessor({ size: { height: 224, width: 224 }, resample: 3 });
  const batch = Array.from({ length: BATCH }, () => jpeg);
  console.log(JSON.stringify({
    bench: 'processor', setup: true, node: process.version, cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model,
    uvThreadpool: Number(process.env.UV_THREADPOOL_SIZE ?? 4), imageThreads: process.env.BLIP2_IMAGE_THREADS ?? 'default',
    sharpConcurrency: sharp.concurrency(), jpegBytes: jpeg.length, input: '1024x768 JPEG q90', output: '224x224', device,
  }));

  const ours = async (images: Buffer | Buffer[]) => {
    const pv = await ip.preprocess(images, { device });
    pv.dispose();
  };
  const sharpResize = async () => {
    await sharp(jpeg).resize(224, 224, { fit: 'fill', kernel: 'cubic' }).raw().toBuffer();
  };
  const sharpDecode = async () => {
    await sharp(jpeg).raw().toBuffer();
  };

  // Warm up: libtorch, the pools, sharp's caches.
  for (let i = 0; i < 3; i++) {
    await ours(jpeg);
    await ours(batch);
    await sharpResize();
  }

  report('blip2-node BlipImageProcessor (decode + PIL-exact resize + normalize)', 1, runs, await time(() => ours(jpeg), runs));
  report('sharp resize to raw 224x224 (baseline)', 1, runs, await time(sharpResize, runs));
  report('sharp full-size decode to raw, no resize (decode share)', 1, runs, await time(sharpDecode, runs));

  report('blip2-node BlipImageProcessor (decode + PIL-exact resize + normalize)', BATCH, batchRuns, await time(() => ours(batch), batchRuns));
  report('sharp resize to raw 224x224 (baseline)', BATCH, batchRuns,
    await time(async () => { await Promise.all(batch.map(() => sharpResize())); }, batchRuns));
  report('sharp full-size decode to raw, no resize (decode share)', BATCH, batchRuns,
    await time(async () => { await Promise.all(batch.map(() => sharpDecode())); }, batchRuns));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
