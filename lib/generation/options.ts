// Generation options as transformers names them (camelCase), their defaults from the model's
// generation_config.json, and validation with errors that name the option, value and range.
import type { NativeGenerateOptions, NativeStepEvent } from '../../typings/binding';
import { InvalidArgumentError } from '../errors';
import { finite, integer } from '../validation';
import type { TokenDelta } from './streaming';

/** Options of generate(), transformers' generation parameters in camelCase. Each default is the model's generation_config.json value when it has one, else transformers' default (stated per option). */
export interface GenerateOptions {
  /** New tokens at most (default: generation_config's max_new_tokens, else its max_length, else 20). */
  maxNewTokens?: number;
  /** New tokens before an end-of-sequence token may be chosen (default 0). */
  minNewTokens?: number;
  /** Sample instead of choosing the most likely token (default false). */
  doSample?: boolean;
  /** Sampling temperature, > 0 (default 1). */
  temperature?: number;
  /** Sampling: keep the k most likely tokens; 0 disables (default 50, as transformers). */
  topK?: number;
  /** Sampling: nucleus probability in (0, 1] (default 1 = off). */
  topP?: number;
  /** A number > 0; 1 = off (default 1). Penalises every token already in the sequence (prompt included), as transformers. */
  repetitionPenalty?: number;
  /** Beam search with this many beams; 1 = greedy or sampling (default 1). */
  numBeams?: number;
  /** Beam search: scores are divided by the length to the power lengthPenalty (default 1). */
  lengthPenalty?: number;
  /** Beam search: stop when numBeams hypotheses are done (true), heuristically (false), or only when no better one can come ('never') (default false). */
  earlyStopping?: boolean | 'never';
  /** Sequences per input row, at most numBeams with beam search (default 1). */
  numReturnSequences?: number;
  /** End-of-sequence token id(s) (default: the model's, from manifest.json). */
  eosTokenId?: number | number[];
  /** Fills finished rows (default: the model's pad token, else the first eosTokenId). */
  padTokenId?: number;
  /** Makes sampling reproducible (same seed, same tokens); default: a random seed per call. */
  seed?: number;
  /** Aborts the generation; generate() then rejects with AbortError (default: none). */
  signal?: AbortSignal;
  /** Called after every decoding step with the new token of each unfinished sequence (greedy and sampling); default: none. */
  onStep?: (event: GenerationStep) => void;
  /** Resolve to { sequences, sequencesScores } instead of the sequences tensor (default false). */
  returnDictInGenerate?: boolean;
  /**
   * Called with each sequence's new token ids and the text they complete (UTF-8 safe), as they
   * are decoded, then once more with the text held back at the end; greedy and sampling (not beam
   * search, whose best sequence is only known at the end). Default: none.
   */
  onToken?: (delta: TokenDelta) => void;
  /**
   * When `signal` aborts: resolve with the tokens generated so far instead of rejecting with
   * AbortError (as node-llama-cpp's stopOnAbortSignal). Default false.
   */
  stopOnAbortSignal?: boolean;
}

/** What `onStep` receives after each decoding step. */
export type GenerationStep = NativeStepEvent;

export interface GenerationDefaults {
  generationConfig: Record<string, unknown> | null;
  eosTokenIds: number[];
  padTokenId: number | null;
  vocabSize: number;
}

const KNOWN_OPTIONS = new Set([
  'maxNewTokens', 'minNewTokens', 'doSample', 'temperature', 'topK', 'topP', 'repetitionPenalty', 'numBeams',
  'lengthPenalty', 'earlyStopping', 'numReturnSequences', 'eosTokenId', 'padTokenId', 'seed', 'signal', 'onStep',
  'returnDictInGenerate', 'onToken', 'stopOnAbortSignal',
]);

function tokenIds(name: string, value: unknown, vocabSize: number): number[] {
  const list = Array.isArray(value) ? value : [value];
  return list.map((id, i) => integer(Array.isArray(value) ? `${name}[${i}]` : name, id, 0, vocabSize - 1));
}

/** Options given > generation_config.json > transformers' GenerationConfig defaults. */
export function resolveGenerateOptions(options: GenerateOptions, defaults: GenerationDefaults): NativeGenerateOptions {
  if (options === null || typeof options !== 'object') throw InvalidArgumentError.of('options', options, 'an object');
  for (const key of Object.keys(options)) {
    if (!KNOWN_OPTIONS.has(key)) throw InvalidArgumentError.of(`options.${key}`, (options as Record<string, unknown>)[key], `no such option (known: ${[...KNOWN_OPTIONS].join(', ')})`);
  }
  const config = defaults.generationConfig ?? {};
  const pick = <T>(given: T | undefined, key: string, fallback: T): T =>
    given !== undefined ? given : config[key] !== undefined && config[key] !== null ? (config[key] as T) : fallback;

  // transformers 4.45 counted max_length in new tokens for BLIP-2 (its LM saw embeddings only).
  const maxNewTokens = integer('maxNewTokens', options.maxNewTokens ?? config.max_new_tokens ?? config.max_length ?? 20, 1);
  const minNewTokens = integer('minNewTokens', pick(options.minNewTokens, 'min_new_tokens', 0), 0);
  const doSample = pick(options.doSample, 'do_sample', false);
  if (typeof doSample !== 'boolean') throw InvalidArgumentError.of('doSample', doSample, 'a boolean');
  const temperature = finite('temperature', pick(options.temperature, 'temperature', 1), (v) => !doSample || v > 0, doSample ? 'a number > 0 when sampling' : 'a number');
  const topK = integer('topK', pick(options.topK, 'top_k', 50), 0);
  const topP = finite('topP', pick(options.topP, 'top_p', 1), (v) => v > 0 && v <= 1, 'a number in (0, 1]');
  const repetitionPenalty = finite('repetitionPenalty', pick(options.repetitionPenalty, 'repetition_penalty', 1), (v) => v > 0, 'a number > 0');
  const numBeams = integer('numBeams', pick(options.numBeams, 'num_beams', 1), 1, 1024);
  const lengthPenalty = finite('lengthPenalty', pick(options.lengthPenalty, 'length_penalty', 1), () => true, 'a finite number');
  const earlyStopping = pick<boolean | 'never'>(options.earlyStopping, 'early_stopping', false);
  if (earlyStopping !== true && earlyStopping !== false && earlyStopping !== 'never') {
    throw InvalidArgumentError.of('earlyStopping', earlyStopping, "true, false or 'never'");
  }
  const numReturnSequences = integer('numReturnSequences', pick(options.numReturnSequences, 'num_return_sequences', 1), 1, 1024);
  if (numBeams > 1 && numReturnSequences > numBeams) {
    throw InvalidArgumentError.of('numReturnSequences', numReturnSequences, `at most numBeams (${numBeams})`);
  }
  if (numBeams === 1 && !doSample && numReturnSequences > 1) {
    throw InvalidArgumentError.of('numReturnSequences', numReturnSequences, '1 for greedy search (use doSample: true or numBeams > 1)');
  }
  if (numBeams > 1 && doSample) {
    throw InvalidArgumentError.of('doSample', doSample, 'false when numBeams > 1 (beam sampling is not supported)');
  }
  const eosGiven = options.eosTokenId ?? config.eos_token_id;
  const eosTokenId = eosGiven === undefined || eosGiven === null ? defaults.eosTokenIds : tokenIds('eosTokenId', eosGiven, defaults.vocabSize);
  const padGiven = options.padTokenId ?? config.pad_token_id ?? defaults.padTokenId ?? eosTokenId[0] ?? 0;
  const padTokenId = integer('padTokenId', padGiven, 0, defaults.vocabSize - 1);
  const resolved: NativeGenerateOptions = {
    maxNewTokens, minNewTokens, doSample, temperature, topK, topP, repetitionPenalty, numBeams, lengthPenalty,
    earlyStopping, numReturnSequences, eosTokenId, padTokenId,
  };
  if (options.seed !== undefined) resolved.seed = integer('seed', options.seed, 0);
  if (options.onStep !== undefined && typeof options.onStep !== 'function') throw InvalidArgumentError.of('onStep', options.onStep, 'a function');
  if (options.onToken !== undefined && typeof options.onToken !== 'function') throw InvalidArgumentError.of('onToken', options.onToken, 'a function');
  if (options.onToken !== undefined && numBeams > 1) {
    throw InvalidArgumentError.of('onToken', options.onToken, 'no onToken with numBeams > 1: beam search only knows its best sequence at the end (stream with greedy or sampling)');
  }
  if (options.stopOnAbortSignal !== undefined && typeof options.stopOnAbortSignal !== 'boolean') {
    throw InvalidArgumentError.of('stopOnAbortSignal', options.stopOnAbortSignal, 'a boolean');
  }
  return resolved;
}
