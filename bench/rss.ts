// Memory under a long serving run: RSS after --checkpoints requests (default 500 and 5,000), with
// the growth between the first and the last checkpoint in percent (goal: within 5%).
//
//   npx tsx bench/rss.ts [--model tiny|mid] [--checkpoints 500,5000] [--concurrency 16] [--threads 2]
//       [--processor]
//
// One model (default: the tiny fixture model, so 5,000 requests take a minute or two; --model mid
// for the mid-size one), 16 concurrent clients in a closed loop. Requests mix 4 prompts of
// different lengths over 16 seeded images and 4 kinds of call (request i: prompt i % 4, kind
// floor(i / 4) % 4, so every wave of 16 mixes them all): greedy 20 tokens, seeded sampling
// 12 tokens, beam search (2 beams) 8 tokens, greedy with an onStep callback 16 tokens (EOS on:
// rows may stop early, as in service). Every request makes its own input tensors (from arrays
// prepared once; with --processor, Blip2Processor.process on the raw image and the prompt) and
// disposes its outputs. The JS heap is garbage-collected before each reading (the script
// restarts itself with --expose-gc), so the numbers are the native side's and the live JS objects'.
import { Blip2ForConditionalGeneration, Blip2Processor, Tensor, setNumThreads, stats } from '../lib';
import {
  arg, imageSize, closedLoop, flag, list, machine, makeRequests, prepare, printJson, PROMPTS, round, rssMb, runChild, seededImage,
} from './common';

const threads = Number(arg('threads', '2'));

async function child(): Promise<void> {
  await setNumThreads(threads);
  const modelDir = arg('model-dir', '');
  const concurrency = Number(arg('concurrency', '16'));
  const checkpoints = list('checkpoints', '500,5000').map(Number).sort((a, b) => a - b);
  const useProcessor = flag('processor');
  const gc = (globalThis as { gc?: () => void }).gc;
  const model = await Blip2ForConditionalGeneration.fromPretrained(modelDir);
  const processor = useProcessor ? await Blip2Processor.fromPretrained(modelDir) : undefined;
  const size = imageSize(model);
  const requests = await makeRequests(modelDir, 16);
  const kinds = [
    { maxNewTokens: 20 },
    { maxNewTokens: 12, doSample: true, topK: 20, temperature: 0.9, seed: 7 },
    { maxNewTokens: 8, numBeams: 2 },
    { maxNewTokens: 16, onStep: () => {} },
  ];
  const send = async (i: number) => {
    const r = requests[i % requests.length];
    let inputs;
    if (processor) {
      inputs = await processor.process({ images: seededImage(i % requests.length), text: PROMPTS[i % PROMPTS.length] });
    } else {
      inputs = {
        pixelValues: Tensor.from(r.pixels, [1, 3, size, size]),
        inputIds: Tensor.from(BigInt64Array.from(r.ids.map(BigInt)), [1, r.ids.length]),
        attentionMask: Tensor.from(BigInt64Array.from(r.ids.map(() => 1n)), [1, r.ids.length]),
      };
    }
    try {
      const out = await model.generate(inputs, kinds[Math.floor(i / 4) % kinds.length]);
      out.dispose();
    } finally {
      inputs.pixelValues.dispose();
      inputs.inputIds.dispose();
      inputs.attentionMask.dispose();
    }
  };
  const reading = (done: number, seconds: number) => {
    gc?.();
    // The JS side's share, to tell a native growth from a JS one.
    const js = process.memoryUsage();
    return {
      event: 'rss', requests: done, seconds: round(seconds, 1), ...rssMb(), js_heap_used_mb: round(js.heapUsed / 2 ** 20, 1),
      js_external_mb: round(js.external / 2 ** 20, 1), model: model.stats(), runtime: stats(),
    };
  };
  printJson(reading(0, 0));
  let done = 0;
  let elapsed = 0;
  const rows = [];
  for (const target of checkpoints) {
    const r = await closedLoop(concurrency, target - done, Infinity, (i) => send(done + i));
    done += r.completed;
    elapsed += r.seconds;
    const row = reading(done, elapsed);
    printJson(row);
    rows.push(row);
  }
  const first = rows[0];
  const last = rows[rows.length - 1];
  printJson({
    event: 'summary', concurrency, processor: useProcessor, gc: gc !== undefined, first_requests: first.requests, last_requests: last.requests,
    first_rss_mb: first.rss_mb, last_rss_mb: last.rss_mb, growth_pct: round(((last.rss_mb - first.rss_mb) / first.rss_mb) * 100, 2),
    peak_rss_mb: last.peak_rss_mb, requests_per_s: round(done / elapsed, 1),
  });
  await model.dispose();
}

async function main(): Promise<void> {
  const preset = arg('model', 'tiny');
  const { modelDir } = prepare(preset);
  const setup = { bench: 'rss', setup: true, model: preset, threads, ...machine() };
  printJson(setup);
  const passOn = ['concurrency', 'checkpoints'].flatMap((k) => (process.argv.includes(`--${k}`) ? [`--${k}`, arg(k, '')] : []));
  const lines = await runChild(__filename, ['--child', '--model-dir', modelDir, '--threads', String(threads), ...passOn,
    ...(flag('processor') ? ['--processor'] : [])], {}, ['--expose-gc']);
  for (const l of lines) printJson({ bench: 'rss', ...l });
  const s = lines.find((l) => l.event === 'summary')!;
  console.log(`\nmachine: ${setup.cpu} x${setup.cpus}, ${setup.mem_gib} GiB, load average ${setup.loadavg_1m} at the start; model ${preset}; ` +
    `concurrency ${s.concurrency}; ${threads} threads; ${s.processor ? 'Blip2Processor per request' : 'input tensors per request'}`);
  console.log('| requests | RSS MiB | peak RSS MiB | live tensors |');
  console.log('|---|---|---|---|');
  for (const l of lines.filter((x) => x.event === 'rss')) {
    console.log(`| ${l.requests} | ${l.rss_mb} | ${l.peak_rss_mb} | ${l.runtime?.liveTensors ?? ''} |`);
  }
  console.log(`\nRSS growth ${s.first_requests} -> ${s.last_requests} requests: ${s.growth_pct}% (goal: within 5%); ${s.requests_per_s} requests/s`);
}

(flag('child') ? child() : main()).catch((e) => {
  console.error(e);
  process.exit(1);
});
