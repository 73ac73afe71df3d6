// POST /v1/chat/completions: OpenAI's request checked and turned into one BLIP-2 call (a prompt,
// one image, generate options), and OpenAI's response objects. Parameters the model cannot honour
// are refused with a 400 naming them; parameters this server does not know are ignored, as vLLM
// and other OpenAI-compatible servers do, so clients that send extras keep working.
import { randomBytes } from 'node:crypto';

import type { GenerateOptions } from '../generation/options';
import { badRequest } from './http-error';
import { integerRange, isInteger } from '../validation';

/** A checked chat request. */
export interface ChatRequest {
  /** `model` as sent (echoed in the response); undefined when absent. */
  model?: string;
  /** The user message's text parts joined by '\n'; '' captions. */
  prompt: string;
  /** The one image part's URL and where it is in the request (for errors). */
  image: { url: unknown; param: string };
  stream: boolean;
  /** stream_options.include_usage: a last chunk with `usage`. */
  includeUsage: boolean;
  /** Choices (numReturnSequences). */
  n: number;
  /** Set only for what the request gave; the model's generation_config.json supplies the rest. */
  options: GenerateOptions;
  /** The field max tokens came from, for errors: max_completion_tokens or max_tokens. */
  maxTokensParam: string;
}

type Json = Record<string, unknown>;

const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);
const given = (body: Json, key: string): boolean => body[key] !== undefined && body[key] !== null;

function integer(body: Json, key: string, min: number, max = Number.MAX_SAFE_INTEGER): number | undefined {
  if (!given(body, key)) return undefined;
  const v = body[key];
  if (!isInteger(v, min, max)) throw badRequest(key, `'${key}' is ${JSON.stringify(v)}; expected ${integerRange(min, max)}`);
  return v;
}

function number(body: Json, key: string, ok: (v: number) => boolean, expected: string): number | undefined {
  if (!given(body, key)) return undefined;
  const v = body[key];
  if (typeof v !== 'number' || !Number.isFinite(v) || !ok(v)) throw badRequest(key, `'${key}' is ${JSON.stringify(v)}; expected ${expected}`);
  return v;
}

function boolean(body: Json, key: string): boolean | undefined {
  if (!given(body, key)) return undefined;
  if (typeof body[key] !== 'boolean') throw badRequest(key, `'${key}' is ${JSON.stringify(body[key])}; expected true or false`);
  return body[key] as boolean;
}

/** OpenAI parameters that would change the output in ways BLIP-2 here cannot: accepted only at their "off" value. */
const UNSUPPORTED: Array<[string, (v: unknown) => boolean, string]> = [
  ['stop', (v) => v === '' || (Array.isArray(v) && v.length === 0), 'stop sequences are not supported by this server; the generation ends at the end-of-sequence token or max_tokens'],
  ['frequency_penalty', (v) => v === 0, "frequency_penalty is not supported (only 0); repetition_penalty (transformers') is"],
  ['presence_penalty', (v) => v === 0, "presence_penalty is not supported (only 0); repetition_penalty (transformers') is"],
  ['logprobs', (v) => v === false, 'logprobs are not supported by this server'],
  ['top_logprobs', (v) => v === 0, 'logprobs are not supported by this server'],
  ['logit_bias', (v) => isObject(v) && Object.keys(v).length === 0, 'logit_bias is not supported by this server'],
  ['tools', (v) => Array.isArray(v) && v.length === 0, 'tools are not supported: BLIP-2 answers in plain text'],
  ['functions', (v) => Array.isArray(v) && v.length === 0, 'functions are not supported: BLIP-2 answers in plain text'],
  ['tool_choice', (v) => v === 'none', 'tools are not supported: BLIP-2 answers in plain text'],
  ['response_format', (v) => isObject(v) && v.type === 'text', 'only response_format {"type": "text"} is supported: BLIP-2 answers in plain text'],
  ['modalities', (v) => Array.isArray(v) && v.every((m) => m === 'text'), 'only the text modality is supported'],
  ['audio', () => false, 'audio output is not supported'],
];

/** The user message's prompt and its one image. */
function readMessages(body: Json): { prompt: string; image: { url: unknown; param: string } } {
  const messages = body.messages;
  if (!Array.isArray(messages) || messages.length === 0) {
    throw badRequest('messages', "'messages' must be a non-empty array holding one user message (its text and one image)", 'missing_messages');
  }
  // BLIP-2 has no chat template and no conversation: one user message is the whole input.
  if (messages.length > 1) {
    throw badRequest('messages', `'messages' holds ${messages.length} messages; BLIP-2 has no chat template: send exactly one user message (a prompt and one image)`);
  }
  const message = messages[0];
  if (!isObject(message)) throw badRequest('messages[0]', "messages[0] must be an object { role: 'user', content }");
  if (message.role !== 'user') {
    throw badRequest('messages[0].role', `messages[0].role is ${JSON.stringify(message.role)}; expected 'user' (BLIP-2 takes one user message: a prompt and one image)`);
  }
  const content = message.content;
  const texts: string[] = [];
  const images: Array<{ url: unknown; param: string }> = [];
  if (typeof content === 'string') {
    texts.push(content);
  } else if (Array.isArray(content)) {
    content.forEach((part, j) => {
      const at = `messages[0].content[${j}]`;
      if (!isObject(part)) throw badRequest(at, `${at} must be an object { type: 'text', text } or { type: 'image_url', image_url: { url } }`);
      if (part.type === 'text') {
        if (typeof part.text !== 'string') throw badRequest(`${at}.text`, `${at}.text must be a string`);
        texts.push(part.text);
      } else if (part.type === 'image_url') {
        // Some clients send image_url as the URL itself.
        const imageUrl = part.image_url;
        if (typeof imageUrl === 'string') images.push({ url: imageUrl, param: `${at}.image_url` });
        else if (isObject(imageUrl)) images.push({ url: imageUrl.url, param: `${at}.image_url.url` });
        else throw badRequest(`${at}.image_url`, `${at}.image_url must be an object { url }`);
      } else {
        throw badRequest(`${at}.type`, `${at}.type is ${JSON.stringify(part.type)}; expected 'text' or 'image_url'`, 'unsupported_content_part');
      }
    });
  } else {
    throw badRequest('messages[0].content', 'messages[0].content must be a string or an array of content parts');
  }
  if (images.length === 0) {
    throw badRequest('messages[0].content',
      "the message has no image; BLIP-2 needs exactly one per request: add a part { type: 'image_url', image_url: { url: 'data:image/jpeg;base64,...' } }", 'missing_image');
  }
  if (images.length > 1) {
    throw badRequest(images[1].param.replace(/\.image_url(\.url)?$/, ''),
      `the message has ${images.length} images; BLIP-2 takes exactly one image per request (send one request per image)`, 'too_many_images');
  }
  return { prompt: texts.join('\n'), image: images[0] };
}

/**
 * Checks a request body and maps it to generate options. `samplesByDefault`: the model's
 * generation_config.json samples when the request does not say (then n > 1 needs no temperature).
 */
export function parseChatRequest(body: unknown, samplesByDefault: boolean): ChatRequest {
  if (!isObject(body)) throw badRequest(null, 'the request body must be a JSON object', 'invalid_body');
  if (given(body, 'model') && typeof body.model !== 'string') throw badRequest('model', "'model' must be a string");
  for (const [key, off, message] of UNSUPPORTED) {
    if (given(body, key) && !off(body[key])) throw badRequest(key, message, 'unsupported_parameter');
  }
  const { prompt, image } = readMessages(body);

  const maxCompletion = integer(body, 'max_completion_tokens', 1);
  const maxTokensLegacy = integer(body, 'max_tokens', 1);
  if (maxCompletion !== undefined && maxTokensLegacy !== undefined && maxCompletion !== maxTokensLegacy) {
    throw badRequest('max_tokens', `max_tokens (${maxTokensLegacy}) and max_completion_tokens (${maxCompletion}) differ; give one of them`);
  }
  const maxTokens = maxCompletion ?? maxTokensLegacy;
  const temperature = number(body, 'temperature', (v) => v >= 0 && v <= 2, 'a number from 0 to 2 (0: greedy)');
  const topP = number(body, 'top_p', (v) => v > 0 && v <= 1, 'a number in (0, 1]');
  const topK = integer(body, 'top_k', 0);
  const repetitionPenalty = number(body, 'repetition_penalty', (v) => v > 0, 'a number > 0 (1: off)');
  const seed = integer(body, 'seed', 0);
  const n = integer(body, 'n', 1, 1024) ?? 1;
  const stream = boolean(body, 'stream') ?? false;
  let includeUsage = false;
  if (given(body, 'stream_options')) {
    if (!stream) throw badRequest('stream_options', "stream_options is only allowed with 'stream': true");
    if (!isObject(body.stream_options)) throw badRequest('stream_options', "'stream_options' must be an object { include_usage }");
    includeUsage = boolean(body.stream_options, 'include_usage') ?? false;
  }

  // temperature 0 is greedy; > 0 samples at that temperature; absent: the model's default
  // (BLIP-2 checkpoints decode greedily), unlike OpenAI, whose default temperature is 1.
  const options: GenerateOptions = { numBeams: 1 }; // beam search cannot stream and OpenAI has no parameter for it
  if (maxTokens !== undefined) options.maxNewTokens = maxTokens;
  if (temperature === 0) options.doSample = false;
  else if (temperature !== undefined) Object.assign(options, { doSample: true, temperature });
  if (topP !== undefined) options.topP = topP;
  if (topK !== undefined) options.topK = topK;
  if (repetitionPenalty !== undefined) options.repetitionPenalty = repetitionPenalty;
  if (seed !== undefined) options.seed = seed;
  if (n > 1) {
    const samples = options.doSample ?? samplesByDefault;
    if (!samples) throw badRequest('n', `n is ${n}: several choices need sampling; set temperature > 0 (greedy decoding gives one answer)`);
    options.numReturnSequences = n;
  }
  return {
    model: given(body, 'model') ? (body.model as string) : undefined,
    prompt, image, stream, includeUsage, n, options,
    maxTokensParam: maxCompletion !== undefined ? 'max_completion_tokens' : 'max_tokens',
  };
}

export type FinishReason = 'stop' | 'length';

export interface Usage {
  /** The prompt's positions: the image's query tokens and the text's tokens. */
  prompt_tokens: number;
  /** New tokens of every choice, each one's end-of-sequence token included. */
  completion_tokens: number;
  total_tokens: number;
}

export const usage = (promptTokens: number, completionTokens: number): Usage =>
  ({ prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens });

export const completionId = (): string => `chatcmpl-${randomBytes(12).toString('hex')}`;

/** The fields every response object and chunk of one request share. */
export interface ResponseHead {
  id: string;
  created: number;
  model: string;
}

export function chatCompletion(head: ResponseHead, choices: Array<{ text: string; finishReason: FinishReason }>, use: Usage) {
  return {
    id: head.id, object: 'chat.completion', created: head.created, model: head.model,
    choices: choices.map((c, index) => ({
      index, message: { role: 'assistant', content: c.text, refusal: null }, logprobs: null, finish_reason: c.finishReason,
    })),
    usage: use,
  };
}

export function chatChunk(head: ResponseHead, choices: Array<{ index: number; delta: Record<string, string>; finishReason: FinishReason | null }>, includeUsage: boolean) {
  const chunk: Record<string, unknown> = {
    id: head.id, object: 'chat.completion.chunk', created: head.created, model: head.model,
    choices: choices.map((c) => ({ index: c.index, delta: c.delta, logprobs: null, finish_reason: c.finishReason })),
  };
  // With include_usage every chunk carries usage: null, and a last one (no choices) the figures.
  if (includeUsage) chunk.usage = null;
  return chunk;
}

export function usageChunk(head: ResponseHead, use: Usage) {
  return { id: head.id, object: 'chat.completion.chunk', created: head.created, model: head.model, choices: [], usage: use };
}
