// A worker thread that loads its own model, captions one image and reports the token ids and the
// text (test/worker-threads.spec.ts). workerData: { modelDir, image, maxNewTokens, streamSteps? }.
import { parentPort, threadId, workerData } from 'node:worker_threads';

import { Blip2ForConditionalGeneration, Blip2Processor } from '../../lib';

export interface CaptionWorkerData {
  modelDir: string;
  image: string;
  maxNewTokens: number;
  /** Post { step } after every decoding step (so the test can terminate the worker mid-generation). */
  streamSteps?: boolean;
}

export interface CaptionWorkerResult {
  ids: number[][];
  texts: string[];
  threadId: number;
}

async function main(): Promise<void> {
  const data = workerData as CaptionWorkerData;
  const processor = await Blip2Processor.fromPretrained(data.modelDir);
  const model = await Blip2ForConditionalGeneration.fromPretrained(data.modelDir);
  const inputs = await processor.process({ images: [data.image], text: [''], padding: 'longest', dtype: model.dtype });
  let step = 0;
  const sequences = await model.generate(inputs, {
    maxNewTokens: data.maxNewTokens,
    onStep: data.streamSteps ? () => parentPort!.postMessage({ step: step++ }) : undefined,
  });
  const flat = Array.from((await sequences.toArray()) as BigInt64Array, Number);
  const width = sequences.shape[1];
  const ids = Array.from({ length: sequences.shape[0] }, (_, r) => flat.slice(r * width, (r + 1) * width));
  const texts = await processor.batchDecode(sequences, { skipSpecialTokens: true });
  for (const t of [sequences, inputs.pixelValues, inputs.inputIds, inputs.attentionMask]) t.dispose();
  model.dispose();
  parentPort!.postMessage({ ids, texts, threadId } satisfies CaptionWorkerResult);
}

main().catch((error: unknown) => {
  // An uncaught rejection would end the worker too; this way the test sees the message and code 3.
  parentPort!.postMessage({ error: (error as Error).stack ?? String(error) });
  process.exit(3);
});
