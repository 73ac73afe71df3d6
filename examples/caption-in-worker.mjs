// Captioning from a worker thread: the worker owns a model and answers { id, file } messages with
// { id, text }. The addon already runs libtorch off the event loop, so a worker is not needed for
// that; it is for apps that keep heavy work in workers, or run several models side by side (each
// worker loads its own; they share the addon's per-device executor threads).
//
//   npm run build:ts                         # once: the example imports the package, i.e. dist/
//   node examples/caption-in-worker.mjs [image...] [--model <model-dir>] [--device cpu|cuda]
//
// Defaults: assets/demo.jpg and the bundled demo model (random weights: gibberish captions).
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';

if (isMainThread) {
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
  const args = process.argv.slice(2);
  const option = (name, fallback) => {
    const at = args.indexOf(name);
    return at < 0 ? fallback : args.splice(at, 2)[1];
  };
  const modelDir = option('--model', path.join(root, 'models', 'tiny-random-opt'));
  const device = option('--device', 'cpu');
  const images = args.length > 0 ? args : [path.join(root, 'assets', 'demo.jpg')];

  const worker = new Worker(new URL(import.meta.url), { workerData: { modelDir, device } });
  const pending = new Map();
  let nextId = 0;
  worker.on('message', ({ id, text, error }) => {
    const call = pending.get(id);
    pending.delete(id);
    if (error !== undefined) call.reject(new Error(error));
    else call.resolve(text);
  });
  const exited = new Promise((resolve, reject) => {
    worker.once('error', reject); // an exception the worker did not catch
    worker.once('exit', resolve);
  });
  const caption = (file) => new Promise((resolve, reject) => {
    const id = nextId++;
    pending.set(id, { resolve, reject });
    worker.postMessage({ id, file });
  });

  // All in flight at once: the worker's generate calls interleave on the addon's executor.
  const results = await Promise.allSettled(images.map(caption));
  results.forEach((result, i) => {
    const file = path.relative(process.cwd(), images[i]);
    if (result.status === 'fulfilled') console.log(`${file}: ${JSON.stringify(result.value)}`);
    else console.error(`${file}: ${result.reason.message}`);
  });
  worker.postMessage({ close: true });
  const code = await exited;
  if (code !== 0) throw new Error(`the worker exited with code ${code}`);
  process.exitCode = results.some((r) => r.status === 'rejected') ? 1 : 0;
} else {
  const { Blip2ForConditionalGeneration, Blip2Processor } = await import('blip2-node');
  const processor = await Blip2Processor.fromPretrained(workerData.modelDir);
  const model = await Blip2ForConditionalGeneration.fromPretrained(workerData.modelDir, { device: workerData.device });
  let inFlight = 0;
  let closing = false;
  const closeIfIdle = () => {
    if (closing && inFlight === 0) {
      model.dispose();
      parentPort.close(); // nothing else keeps the worker alive: it exits with code 0
    }
  };
  parentPort.on('message', async (message) => {
    if (message.close) {
      closing = true;
      closeIfIdle();
      return;
    }
    inFlight++;
    try {
      const inputs = await processor.process({ images: message.file, text: '', device: model.device, dtype: model.dtype });
      const sequences = await model.generate(inputs, { maxNewTokens: 20 });
      const [text] = await processor.batchDecode(sequences, { skipSpecialTokens: true });
      for (const tensor of [sequences, inputs.pixelValues, inputs.inputIds, inputs.attentionMask]) tensor.dispose();
      parentPort.postMessage({ id: message.id, text: text.trim() });
    } catch (error) {
      parentPort.postMessage({ id: message.id, error: error.message });
    } finally {
      inFlight--;
      closeIfIdle();
    }
  });
}
