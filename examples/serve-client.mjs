// Calling `blip2 serve` with plain fetch: one caption request, then the same streamed (server-sent
// events), with the image sent inline as a data: URL. No SDK needed; the OpenAI SDKs work too
// (baseURL http://127.0.0.1:8080/v1, any apiKey).
//
//   npx blip2 serve --model models/tiny-random-opt            # in another terminal
//   node examples/serve-client.mjs [image] [--url http://127.0.0.1:8080] [--prompt "Question: what is this? Answer:"]
//
// Defaults: assets/demo.jpg, a caption (no prompt). The demo model has RANDOM weights: gibberish.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const option = (name, fallback) => {
  const at = args.indexOf(name);
  return at < 0 ? fallback : args.splice(at, 2)[1];
};
const url = option('--url', 'http://127.0.0.1:8080');
const prompt = option('--prompt', '');
const image = args[0] ?? path.join(root, 'assets', 'demo.jpg');

const mime = { '.png': 'image/png', '.webp': 'image/webp', '.gif': 'image/gif' }[path.extname(image).toLowerCase()] ?? 'image/jpeg';
const imageUrl = `data:${mime};base64,${fs.readFileSync(image).toString('base64')}`;
const request = {
  model: 'blip2',
  messages: [{
    role: 'user',
    content: [
      { type: 'text', text: prompt }, // '' captions; "Question: ... Answer:" asks
      { type: 'image_url', image_url: { url: imageUrl } },
    ],
  }],
  max_tokens: 30,
};

async function call(body) {
  const res = await fetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  if (!res.ok) {
    const { error } = await res.json();
    throw new Error(`${res.status} ${error.code}${error.param ? ` (${error.param})` : ''}: ${error.message}`);
  }
  return res;
}

// 1. One response with the whole answer.
const completion = await (await call(request)).json();
console.log('answer:', JSON.stringify(completion.choices[0].message.content));
console.log('finish_reason:', completion.choices[0].finish_reason, '· usage:', completion.usage);

// 2. Streamed: `data: {chunk}` events, each with a text delta, then `data: [DONE]`.
const res = await call({ ...request, stream: true, stream_options: { include_usage: true } });
const decoder = new TextDecoder();
let buffered = '';
let text = '';
process.stdout.write('streamed: ');
for await (const bytes of res.body) {
  buffered += decoder.decode(bytes, { stream: true });
  let end;
  while ((end = buffered.indexOf('\n\n')) >= 0) {
    const event = buffered.slice(0, end);
    buffered = buffered.slice(end + 2);
    if (!event.startsWith('data: ')) continue;
    const data = event.slice('data: '.length);
    if (data === '[DONE]') continue;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(`stream error: ${chunk.error.message}`);
    for (const choice of chunk.choices) {
      const delta = choice.delta.content ?? '';
      text += delta;
      process.stdout.write(JSON.stringify(delta).slice(1, -1));
      if (choice.finish_reason) process.stdout.write(`  [${choice.finish_reason}]`);
    }
    if (chunk.usage) process.stdout.write(`\nusage: ${JSON.stringify(chunk.usage)}`);
  }
}
process.stdout.write('\n');
console.log(text === completion.choices[0].message.content ? 'the stream gave the same text (greedy decoding)' : 'the stream differs (sampling?)');
