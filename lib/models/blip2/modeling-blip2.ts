// Blip2ForConditionalGeneration (OPT language models): captioning and visual question answering.
import type {
  NativeBlip2Model, NativeCancelToken, NativeDType, NativeAttentionDecision, NativeLinearDecision, NativeModelStats, NativeStepEvent,
} from '../../../typings/binding';
import { AbortError, DTypeError, DisposedError, InternalError, InvalidArgumentError, ModelLoadError, ShapeError } from '../../errors';
import { type GenerateOptions, type GenerationStep, resolveGenerateOptions } from '../../generation/options';
import { finite, integer } from '../../validation';
import { TextStreamer, type TokenDelta } from '../../generation/streaming';
import { PreTrainedTokenizer } from '../../processing/tokenizer';
import { binding } from '../../native/binding';
import { requireSignal, withAbort } from '../../runtime/abort';
import { requireDeviceString } from '../../runtime/device';
import { ScriptModule, type ScriptOutput } from '../../runtime/script-module';
import { Tensor } from '../../tensor/tensor';
import * as path from 'node:path';

import { type Manifest, type ModelFolder, readModelFolder } from '../model-folder';
import type { Blip2ConfigJSON as Blip2Config, GenerationConfigJSON as GenerationConfig } from './configuration';

/** Options of Blip2ForConditionalGeneration.fromPretrained(). */
export interface FromPretrainedOptions {
  /** 'cpu' (default), 'cuda' or 'cuda:N'. */
  device?: string;
  /** Run in another dtype than the export's (e.g. a float32 export in 'bfloat16'); default: the export's dtype (manifest.json). */
  dtype?: 'float32' | 'float16' | 'bfloat16';
  /** Aborts the load; fromPretrained() then rejects with AbortError (default: none). */
  signal?: AbortSignal;
  /** Called as the load advances, ending with progress 1 (see LoadProgress); default: none. */
  onLoadProgress?: (progress: LoadProgress) => void;
  /**
   * The vision model's attention: 'eager' (default) runs transformers' eager ops, for exact
   * parity; 'sdpa' the fused kernel of transformers' sdpa path, within float rounding of eager
   * (about 5e-7) and several times faster on 257 image tokens.
   */
  attention?: 'eager' | 'sdpa';
  /**
   * Sequences decoded together at most: the slots of the model's one KV cache, shared by every
   * generate() call (a call needs images x numBeams, or x numReturnSequences, of them). Default 16.
   */
  maxBatchSize?: number;
  /** Positions one sequence may use (image queries + prompt + new tokens). Default: the export's max_length, at most 512. */
  maxLength?: number;
  /** generate() calls that may wait for slots; one more rejects at once with QueueFullError. Default 1024. */
  maxQueue?: number;
  /**
   * Upper bound on the KV cache's bytes (slots x maxLength x layers x 2 x heads x head_dim x
   * dtype size): maxBatchSize is lowered to what fits. On the CPU only the positions sequences
   * fill become resident. Default: 8 GiB.
   */
  kvCacheMaxBytes?: number;
  /**
   * Prompt tokens written into the cache per scheduler cycle while other sequences decode, so long
   * prompts interleave with decoding: smaller holds running sequences up less, larger admits new
   * calls faster (with nothing decoding, up to 2048 go at once). An OPT export with the `step`
   * method (this exporter's) writes them inside the decode step's own language-model call, one
   * pass over the weights for both. Default on the CPU with `step`: as many as add `stallBudget`
   * decode steps to the step that carries them, from the costs the model measures as it runs (16 to 256;
   * 64 until measured); 256 without `step`, 1024 on CUDA. Measured on 2 Zen 5 cores, mid-size
   * model, calls arriving out of step: a 16-row decode step takes ~20 ms, with a chunk of 64
   * prompt tokens in it ~50 ms; a separate prefill call costs ~0.7 ms per prompt token
   * (bench/RESULTS.md has the figures). `model.stats().stepPrefillBudget` shows the current value.
   */
  prefillChunk?: number;
  /**
   * Images of waiting calls encoded together per cycle at most while other sequences decode (2 Zen
   * 5 cores, mid-size model: 25 ms for one image, 22 ms per image in a batch of 16). With nothing
   * decoding, nobody waits: at least 16 go together. Default 1 on the CPU, 16 on CUDA.
   */
  encodeBatch?: number;
  /**
   * Vision layers of an image encode run per cycle while other sequences decode, so that an encode
   * (a ViT-g one is ~15 decode steps of OPT-2.7B on a CPU) is spread over several steps instead of
   * holding them all up at once. Exports from this version on have the staged methods; older ones
   * are encoded whole. Default on the CPU: as many as fit, beside the prompt chunk, in `stallBudget`
   * decode steps (measured as the model runs); on CUDA the whole encode at once.
   */
  encodeLayersPerStep?: number;
  /**
   * How much work for arriving calls (their image encode and prompt) a decode step may carry while
   * other sequences decode, in units of a decode step's own time, measured as the model runs (CPU):
   * running sequences then wait about 1 + stallBudget steps at most between two tokens. Default 1:
   * an arriving call stalls the running ones by about one step. Larger admits arriving calls
   * faster, for more requests/s when calls arrive out of step and their encodes and prompts are a
   * large part of the work. Measured on 2 Intel Xeon cores, mid-size model, 16 clients 70 ms apart
   * (bench/RESULTS.md): 1 gave gaps between two tokens of p99 66-81 ms at 5.2-6.5 req/s (too little
   * admission work per step to keep the slots filled); 1.6 gave p99 112 ms at 8.3 req/s; 2 p99
   * 118 ms at 8.6 req/s. Calls arriving at an idle model together are admitted at once whatever
   * the budget.
   * With prefillChunk given, that chunk is taken as it is and image layers get what is left; on
   * CUDA (where host-side times are not costs) neither is sized by it.
   */
  stallBudget?: number;
  /**
   * Milliseconds an idle model waits for more calls to encode with the one that arrived: until no
   * call has arrived for this long (calls that finished together come back one callback after
   * another), at most 8 times this after the first, or until the free slots or an image batch (16,
   * or encodeBatch if larger) are filled. 0 admits at once. Default 2.
   */
  batchWaitMs?: number;
}

/**
 * What onLoadProgress receives, as node-llama-cpp's onLoadProgress and transformers.js's
 * progress_callback: `progress` in (0, 1], never decreasing, over the bytes checked (the module
 * files' sha256) and bound (the weights: views of the mapped files on the CPU, copies elsewhere).
 */
export interface LoadProgress {
  progress: number;
  loadedBytes: number;
  totalBytes: number;
}

/** Reports load progress monotonically; a throwing callback aborts nothing (its error is reported once). */
function progressReporter(callback: ((p: LoadProgress) => void) | undefined, totalBytes: number) {
  if (callback !== undefined && typeof callback !== 'function') throw InvalidArgumentError.of('onLoadProgress', callback, 'a function');
  let last = 0;
  return (loadedBytes: number): void => {
    if (!callback) return;
    const progress = totalBytes > 0 ? Math.min(1, loadedBytes / totalBytes) : 1;
    if (progress <= last && !(progress === 1 && last < 1)) return;
    last = progress;
    try {
      callback({ progress, loadedBytes: Math.min(loadedBytes, totalBytes), totalBytes });
    } catch (e) {
      process.emitWarning(`onLoadProgress threw: ${(e as Error).message}`);
    }
  };
}

/** Live figures of one loaded model's scheduler (model.stats()). */
export type ModelStats = NativeModelStats;

/** The inputs of generate() and forward(): what Blip2Processor.process() returns. */
export interface Blip2Inputs {
  /** [B, 3, H, W] float (Blip2Processor's pixelValues). */
  pixelValues: Tensor;
  /** T5 models' forward(): [B, Td] int64 decoder input ids (transformers needs them or labels). */
  decoderInputIds?: Tensor;
  /** [B, T] int64; omitted: caption from BOS (after the <image> placeholders when the model has them). */
  inputIds?: Tensor;
  /** [B, T] of 0/1, same shape as inputIds. */
  attentionMask?: Tensor;
}

/** What generate() resolves to with `returnDictInGenerate: true`. */
export interface GenerateOutput {
  /** [rows, promptLength + newTokens] int64 on the CPU: the input ids, then the new ids. */
  sequences: Tensor<'int64'>;
  /** Beam search: [rows] float32 length-normalised log-probabilities; null otherwise. */
  sequencesScores: Tensor<'float32'> | null;
}

const NativeModel = binding.NativeBlip2Model;

/**
 * BLIP-2 for captioning and visual question answering, as transformers'
 * Blip2ForConditionalGeneration, loaded from a model folder made by `npx blip2 export`.
 */
export class Blip2ForConditionalGeneration {
  readonly config: Blip2Config;
  readonly generationConfig: GenerationConfig | null;
  readonly manifest: Manifest;
  readonly modelDir: string;
  readonly #native: NativeBlip2Model;

  #tokenizer: PreTrainedTokenizer | undefined;
  #disposed: Promise<void> | undefined;

  private constructor(native: NativeBlip2Model, modelDir: string, manifest: Manifest, config: Blip2Config, generationConfig: GenerationConfig | null) {
    this.#native = native;
    this.modelDir = modelDir;
    this.manifest = manifest;
    this.config = config;
    this.generationConfig = generationConfig;
  }

  /** Loads a model folder made by `npx blip2 export` onto `options.device`. */
  static async fromPretrained(modelDir: string, options: FromPretrainedOptions = {}): Promise<Blip2ForConditionalGeneration> {
    const { native, folder } = await loadRuntime(modelDir, options, 'Blip2ForConditionalGeneration');
    const { manifest } = folder;
    return new Blip2ForConditionalGeneration(native, modelDir, manifest, folder.config as Blip2Config, folder.generationConfig as GenerationConfig | null);
  }

  /** The device the model runs on: 'cpu' or 'cuda:N'. */
  get device(): string {
    return this.#native.device;
  }
  /** The dtype the model runs in (the export's, or FromPretrainedOptions.dtype). */
  get dtype(): 'float32' | 'float16' | 'bfloat16' {
    return this.#native.dtype as 'float32' | 'float16' | 'bfloat16';
  }

  /**
   * What the load-time timing chose for each weight shape of the model on this CPU and each row
   * bucket (1, 4, 16, 64, more): at::linear ('plain'), the runtime's product kernel ('kernel'; up to
   * 4 rows, after the first decode steps, possibly 'kernel-prefetch': the same results with software
   * prefetch of the next weight rows, kept where the decode products measured faster with it) or
   * oneDNN's matmul ('onednn'), with each path's time (empty on other devices or with
   * BLIP2_LINEAR_KERNEL=off).
   */
  get linearKernels(): NativeLinearDecision[] {
    return this.#native.linearKernels;
  }

  /**
   * What the load-time timing chose for the language model's attention on the KV cache in decode
   * steps (one query row per sequence and head): for its two products ('scores', 'values') and its
   * writes of the new keys and values ('cache-write'), libtorch's op ('plain') or the runtime's
   * kernel ('kernel'), with both times at 1 and 16 rows (empty on other devices or with
   * BLIP2_LINEAR_KERNEL=off or BLIP2_ATTENTION_KERNEL=off).
   */
  get attentionKernels(): NativeAttentionDecision[] {
    return this.#native.attentionKernels;
  }

  /** Query embeddings in the language model's space, [B, num_query_tokens, hidden] (vision → Q-Former → projection). */
  getImageFeatures(pixelValues: Tensor, options: { signal?: AbortSignal } = {}): Promise<Tensor> {
    if (options === null || typeof options !== 'object') return Promise.reject(InvalidArgumentError.of('options', options, 'an object'));
    return this.#run(options.signal, async (token) => Tensor.fromNative(await this.#native.encodeImages(Tensor.native(pixelValues, 'pixelValues'), token)),
      (late) => late.dispose());
  }

  /** transformers' forward: `logits` [B, T, V] over every position (image positions included). */
  forward(inputs: Blip2Inputs, options: { signal?: AbortSignal } = {}): Promise<{ logits: Tensor<'float32'> }> {
    return this.#run(options.signal, async (token) => {
      const [pixels, ids, mask] = nativeInputs(inputs);
      const decoder = inputs.decoderInputIds === undefined || inputs.decoderInputIds === null
        ? null : Tensor.native(inputs.decoderInputIds, 'inputs.decoderInputIds');
      return { logits: Tensor.fromNative<'float32'>(await this.#native.forward(pixels, ids, mask, decoder, token)) };
    }, ({ logits }) => logits.dispose());
  }

  /**
   * Captions (no text) or answers (a prompt) as transformers' generate does for OPT: resolves to
   * int64 sequences [B·numReturnSequences, T + new], the input ids followed by the new ids.
   */
  generate(inputs: Blip2Inputs, options: GenerateOptions & { returnDictInGenerate: true }): Promise<GenerateOutput>;
  generate(inputs: Blip2Inputs, options?: GenerateOptions): Promise<Tensor<'int64'>>;
  generate(inputs: Blip2Inputs, options: GenerateOptions = {}): Promise<Tensor<'int64'> | GenerateOutput> {
    let resolved;
    let streamer: TextStreamer | undefined;
    try {
      resolved = resolveGenerateOptions(options, {
        generationConfig: this.generationConfig,
        eosTokenIds: this.manifest.special_tokens.eos_token_id ?? [],
        padTokenId: this.manifest.special_tokens.pad_token_id,
        vocabSize: this.manifest.vocab_size,
      });
      requireSignal(options.signal, 'signal');
      if (options.onToken) streamer = this.#textStreamer();
    } catch (e) {
      return Promise.reject(e);
    }
    // A throwing onStep or onToken aborts the generation and its error is what generate() rejects with.
    const stepController = new AbortController();
    let stepError: unknown;
    const userOnStep = options.onStep;
    const userOnToken = options.onToken;
    const onStep = userOnStep || userOnToken
      ? (event: NativeStepEvent): void => {
          if (stepError !== undefined) return;
          try {
            userOnStep?.(event as GenerationStep);
            if (userOnToken && streamer) {
              for (let i = 0; i < event.sequences.length; i++) userOnToken(streamer.push(event.sequences[i], [event.tokens[i]]));
            }
          } catch (e) {
            stepError = e;
            stepController.abort();
          }
        }
      : null;
    const stopOnAbort = options.stopOnAbortSignal === true;
    const run = async (token: NativeCancelToken | undefined) => {
      const [pixels, ids, mask] = nativeInputs(inputs);
      const out = await this.#native.generate(pixels, ids, mask, resolved, onStep, token, stopOnAbort);
      return {
        sequences: Tensor.fromNative<'int64'>(out.sequences),
        sequencesScores: out.sequencesScores ? Tensor.fromNative<'float32'>(out.sequencesScores) : null,
      };
    };
    let result: Promise<GenerateOutput>;
    if (stopOnAbort) {
      // The call resolves with what it has when the signal fires: the native side stops within one
      // step and settles with the tokens so far.
      result = this.#runUntilAborted([options.signal, stepController.signal], run);
    } else {
      const signals = [options.signal, stepController.signal].filter((s): s is AbortSignal => s !== undefined);
      const signal = signals.length === 1 ? signals[0] : AbortSignal.any(signals);
      result = this.#run(signal, run, (late) => {
        late.sequences.dispose();
        late.sequencesScores?.dispose();
      });
    }
    const settled = result.then((out) => {
      if (userOnToken && streamer && stepError === undefined) {
        try {
          for (const delta of streamer.flush()) userOnToken(delta);
        } catch (e) {
          stepError = e;
          out.sequences.dispose();
          out.sequencesScores?.dispose();
          throw e;
        }
      }
      if (stepError !== undefined) {
        out.sequences.dispose();
        out.sequencesScores?.dispose();
        throw stepError;
      }
      return out;
    }, (e: unknown) => {
      throw stepError !== undefined && e instanceof AbortError ? stepError : e;
    });
    if (options.returnDictInGenerate) return settled;
    return settled.then((out) => {
      out.sequencesScores?.dispose();
      return out.sequences;
    });
  }

  /**
   * generate() as an async iterator of text deltas `{ sequence, tokenIds, text }` (UTF-8 safe
   * across token boundaries). Leaving the loop early (`break`) cancels the generation; an error
   * of the call is thrown by the loop. Greedy and sampling only.
   */
  async *generateStream(inputs: Blip2Inputs, options: Omit<GenerateOptions, 'onToken' | 'returnDictInGenerate'> = {}): AsyncGenerator<TokenDelta, void, undefined> {
    if (options === null || typeof options !== 'object') throw InvalidArgumentError.of('options', options, 'an object');
    const controller = new AbortController();
    const signal = options.signal ? AbortSignal.any([options.signal, controller.signal]) : controller.signal;
    const pending: TokenDelta[] = [];
    let wake: (() => void) | undefined;
    let done = false;
    let failure: unknown;
    const userSignal = options.signal;
    const call = this.generate(inputs, {
      ...options,
      signal,
      // Leaving the loop waits for the scheduler to have stopped the call and freed its slots.
      stopOnAbortSignal: true,
      onToken: (delta) => {
        pending.push(delta);
        wake?.();
      },
    }).then((sequences) => sequences.dispose(), (e: unknown) => { failure = e; }).finally(() => {
      done = true;
      wake?.();
    });
    try {
      for (;;) {
        while (pending.length > 0) yield pending.shift() as TokenDelta;
        if (done) break;
        await new Promise<void>((resolve) => { wake = resolve; });
        wake = undefined;
      }
      if (failure !== undefined) throw failure;
      // The caller's signal (not our break) ended it: as generate() would, reject.
      if (userSignal?.aborted && !options.stopOnAbortSignal) throw new AbortError('The operation was aborted', { cause: userSignal.reason });
    } finally {
      if (!done) {
        controller.abort();  // the consumer left early: stop decoding, free the slots
        await call;
      }
    }
  }

  /** Live figures: queued calls, running sequences, slots in use, KV-cache bytes, tokens/s (see ModelStats). */
  stats(): ModelStats {
    return this.#native.stats();
  }

  /**
   * Frees the model: new calls reject with DisposedError at once, queued and running ones reject
   * with DisposedError at the scheduler's next cycle, then the KV cache and the weights are freed.
   * The promise resolves once they are. Idempotent.
   */
  dispose(): Promise<void> {
    this.#disposed ??= this.#native.dispose();
    return this.#disposed;
  }

  /** dispose() without waiting, for `using` declarations. */
  [Symbol.dispose](): void {
    void this.dispose();
  }

  /** dispose(), for `await using` declarations. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }

  #textStreamer(): TextStreamer {
    if (this.#disposed) throw new DisposedError('this model has been disposed; it can no longer be used');
    // The model folder carries the checkpoint's tokenizer; it is read on first use.
    this.#tokenizer ??= PreTrainedTokenizer.fromPretrained(this.modelDir);
    const tokenizer = this.#tokenizer;
    return new TextStreamer((ids) => tokenizer.decode(ids, { skipSpecialTokens: true }));
  }

  #runUntilAborted<T>(signals: Array<AbortSignal | undefined>, run: (token: NativeCancelToken) => Promise<T>): Promise<T> {
    const token = new binding.NativeCancelToken();
    const live = signals.filter((s): s is AbortSignal => s !== undefined);
    const cancel = (): void => token.cancel();
    for (const s of live) {
      if (s.aborted) token.cancel();
      else s.addEventListener('abort', cancel, { once: true });
    }
    return run(token).finally(() => {
      for (const s of live) s.removeEventListener('abort', cancel);
    });
  }

  #run<T>(signal: AbortSignal | undefined, run: (token: NativeCancelToken | undefined) => Promise<T>, discard?: (late: T) => void): Promise<T> {
    try {
      return withAbort(requireSignal(signal, 'signal'), run, discard);
    } catch (e) {
      return Promise.reject(e);
    }
  }
}

/** Loads the captioning runtime (modules, weights, scheduler and KV cache) of a folder serving `className`. */
async function loadRuntime(modelDir: string, options: FromPretrainedOptions, className: string): Promise<{ native: NativeBlip2Model; folder: ModelFolder }> {
  if (options === null || typeof options !== 'object') throw InvalidArgumentError.of('options', options, 'an object');
  const device = requireDeviceString(options.device ?? 'cpu', 'device');
  const signal = requireSignal(options.signal, 'signal');
  if (options.dtype !== undefined && !['float32', 'float16', 'bfloat16'].includes(options.dtype)) {
    throw InvalidArgumentError.of('dtype', options.dtype, "'float32', 'float16' or 'bfloat16'");
  }
  const folder = await readModelFolder(modelDir);
  const { manifest } = folder;
  requireClass(folder, className);
  const architecture = manifest.architecture as 'opt' | 't5';
  const dtype: NativeDType = options.dtype ?? manifest.dtype;
  const bos = manifest.special_tokens.bos_token_id ?? -1;
  const eos = manifest.special_tokens.eos_token_id?.[0] ?? -1;
  const scheduler = schedulerOptions(options, manifest, dtype, device);
  checkGenerationConfig(folder);
  const { weights, modules } = folder.nativeWeights(['image_encoder', 'language_model']);
  const checked = manifest.modules.image_encoder.bytes + manifest.modules.language_model.bytes;
  const weightBytes = weights.tensors.reduce((sum, t) => sum + t.nbytes, 0);
  const report = progressReporter(options.onLoadProgress, checked + weightBytes);
  report(checked);
  const native = await withAbort(
    signal,
    (token) => NativeModel.load({
      architecture,
      weights,
      modules: { imageEncoder: modules.image_encoder, languageModel: modules.language_model },
      device,
      dtype,
      numLayers: manifest.language_model.num_layers,
      numHeads: manifest.language_model.num_heads,
      headDim: manifest.language_model.head_dim,
      embedDim: manifest.language_model.embed_dim,
      vocabSize: manifest.vocab_size,
      maxLength: manifest.max_length,
      numQueryTokens: manifest.num_query_tokens,
      imageHeight: (manifest.image_size as [number, number])[0],
      imageWidth: (manifest.image_size as [number, number])[1],
      imageTokenIndex: manifest.image_token_index,
      bosTokenId: bos,
      eosTokenId: eos,
      fusedAttention: fusedAttention(options.attention),
      ...(architecture === 't5' ? {
        decoderStartTokenId: manifest.special_tokens.decoder_start_token_id ?? manifest.special_tokens.pad_token_id ?? 0,
        maxEncoderLength: manifest.max_encoder_length as number,
      } : {}),
    }, scheduler, token, (bound) => report(checked + bound)),
    (late) => void late.dispose(),
  );
  report(checked + weightBytes);
  return { native, folder };
}

/**
 * generation_config.json gives generate()'s defaults: a bad value there is the file's fault, so it
 * fails the load naming the file and field, not every later call naming an option never passed.
 */
function checkGenerationConfig(folder: ModelFolder): void {
  if (!folder.generationConfig) return;
  try {
    resolveGenerateOptions({}, {
      generationConfig: folder.generationConfig,
      eosTokenIds: folder.manifest.special_tokens.eos_token_id ?? [],
      padTokenId: folder.manifest.special_tokens.pad_token_id,
      vocabSize: folder.manifest.vocab_size,
    });
  } catch (e) {
    if (!(e instanceof InvalidArgumentError)) throw e;
    const file = path.join(folder.dir, 'generation_config.json');
    const field = (e.argument ?? '').replace(/\[\d+\]$/, '').replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
    throw new ModelLoadError(`'${file}' is damaged: '${field}' is ${e.value}; expected ${e.expected}`, { file });
  }
}

const DEFAULT_KV_CACHE_MAX_BYTES = 8 * 1024 ** 3;
const DTYPE_BYTES: Record<string, number> = { float32: 4, float16: 2, bfloat16: 2 };

function fusedAttention(attention: unknown): boolean {
  if (attention === undefined || attention === 'eager') return false;
  if (attention === 'sdpa') return true;
  throw InvalidArgumentError.of('attention', attention, "'eager' or 'sdpa'");
}

function positiveInteger(name: string, value: unknown, fallback: number, min = 1): number {
  return value === undefined ? fallback : integer(name, value, min);
}

/** The scheduler's options from fromPretrained's, with the KV cache sized within kvCacheMaxBytes. */
function schedulerOptions(options: FromPretrainedOptions, manifest: Manifest, dtype: NativeDType, device: string) {
  // OPT's sequence holds the image queries and the prompt too; T5's decoder only its start token.
  const minLength = manifest.architecture === 't5' ? 2 : manifest.num_query_tokens + 2;
  const maxLength = positiveInteger('maxLength', options.maxLength, Math.min(manifest.max_length, 512), minLength);
  if (maxLength > manifest.max_length) {
    throw InvalidArgumentError.of('maxLength', maxLength, `at most ${manifest.max_length} (the export's max_length)`);
  }
  const maxBatchSize = positiveInteger('maxBatchSize', options.maxBatchSize, 16);
  const maxQueue = positiveInteger('maxQueue', options.maxQueue, 1024, 0);
  // Absent: the native scheduler picks them for the device and the export (scheduler.h).
  const prefillChunk = options.prefillChunk === undefined ? undefined : integer('prefillChunk', options.prefillChunk, 1);
  const encodeBatch = options.encodeBatch === undefined ? undefined : integer('encodeBatch', options.encodeBatch, 1);
  const encodeLayersPerStep = options.encodeLayersPerStep === undefined ? undefined : integer('encodeLayersPerStep', options.encodeLayersPerStep, 1);
  const stallBudget = options.stallBudget === undefined ? undefined
    : finite('stallBudget', options.stallBudget, (v) => v > 0 && v <= 64, 'a number of decode steps above 0, at most 64');
  const batchWaitMs = finite('batchWaitMs', options.batchWaitMs ?? 2, (v) => v >= 0 && v <= 1000, 'a number of milliseconds from 0 to 1000');
  const kvCacheMaxBytes = positiveInteger('kvCacheMaxBytes', options.kvCacheMaxBytes, DEFAULT_KV_CACHE_MAX_BYTES);
  const lm = manifest.language_model;
  // T5 keeps each slot's cross-attention keys/values too (max_encoder_length positions).
  const positions = maxLength + (manifest.architecture === 't5' ? manifest.max_encoder_length ?? 0 : 0);
  const bytesPerSlot = lm.num_layers * 2 * lm.num_heads * positions * lm.head_dim * DTYPE_BYTES[dtype];
  const slots = Math.min(maxBatchSize, Math.floor(kvCacheMaxBytes / bytesPerSlot));
  if (slots < 1) {
    throw InvalidArgumentError.of('kvCacheMaxBytes', kvCacheMaxBytes,
      `at least ${bytesPerSlot} (one sequence of maxLength ${maxLength} needs that much KV cache; lower maxLength or raise kvCacheMaxBytes)`);
  }
  return { slots, maxLength, maxQueue, prefillChunk, encodeBatch, encodeLayersPerStep, stallBudget, batchWaitUs: Math.round(batchWaitMs * 1000) };
}

/** A ModelLoadError unless the folder's manifest lists `name` among the classes it serves. */
export function requireClass(folder: ModelFolder, name: string): void {
  if (!folder.manifest.classes.includes(name)) {
    throw new ModelLoadError(
      `model folder '${folder.dir}' cannot be loaded as ${name}: it was exported from a ${folder.manifest.checkpoint_class ?? folder.manifest.architecture} checkpoint and serves ${folder.manifest.classes.join(', ')}`,
      { file: path.join(folder.dir, 'manifest.json') },
    );
  }
}

function nativeInputs(inputs: Blip2Inputs) {
  if (inputs === null || typeof inputs !== 'object') throw InvalidArgumentError.of('inputs', inputs, 'an object { pixelValues, inputIds?, attentionMask? }');
  return [
    Tensor.native(inputs.pixelValues, 'inputs.pixelValues'),
    inputs.inputIds === undefined || inputs.inputIds === null ? null : Tensor.native(inputs.inputIds, 'inputs.inputIds'),
    inputs.attentionMask === undefined || inputs.attentionMask === null ? null : Tensor.native(inputs.attentionMask, 'inputs.attentionMask'),
  ] as const;
}

// ------------------------------------------------------------------------------------------------
// The rest of the family: feature models, retrieval, projections. Each loads only the modules it
// needs, with the folder's weights bound (views of the mapped files on the CPU, no copy).

/** Options of the feature and retrieval models' fromPretrained(). */
export interface FeatureModelOptions {
  /** 'cpu' (default), 'cuda' or 'cuda:N'. */
  device?: string;
  /** Run in another dtype than the export's; default: the export's dtype (manifest.json). */
  dtype?: 'float32' | 'float16' | 'bfloat16';
  /** Aborts the load (default: none). */
  signal?: AbortSignal;
  /** Called as the load advances, ending with progress 1 (see LoadProgress); default: none. */
  onLoadProgress?: (progress: LoadProgress) => void;
  /** The vision model's attention (see FromPretrainedOptions.attention); default 'eager'. */
  attention?: 'eager' | 'sdpa';
}

/** Per-call options of the feature and retrieval models. */
export interface CallOptions {
  /** Aborts the call; it then rejects with AbortError (default: none). */
  signal?: AbortSignal;
}

/** transformers' BaseModelOutputWithPooling. */
export interface ModelOutputWithPooling {
  /** `[B, P, D]`: the last layer's hidden states. */
  lastHiddenState: Tensor;
  /** `[B, D]`: the vision model's pooled CLS row (post_layernorm applied again, as transformers), or the Q-Former's first row. */
  poolerOutput: Tensor;
}

interface LoadedModules {
  folder: ModelFolder;
  device: string;
  dtype: NativeDType;
  modules: Record<string, ScriptModule>;
}

async function loadModules(modelDir: string, className: string, names: string[], options: FeatureModelOptions): Promise<LoadedModules> {
  if (options === null || typeof options !== 'object') throw InvalidArgumentError.of('options', options, 'an object');
  const device = requireDeviceString(options.device ?? 'cpu', 'device');
  const signal = requireSignal(options.signal, 'signal');
  if (options.dtype !== undefined && !['float32', 'float16', 'bfloat16'].includes(options.dtype)) {
    throw InvalidArgumentError.of('dtype', options.dtype, "'float32', 'float16' or 'bfloat16'");
  }
  const folder = await readModelFolder(modelDir);
  requireClass(folder, className);
  const dtype: NativeDType = options.dtype ?? folder.manifest.dtype;
  const fused = fusedAttention(options.attention);
  const modules: Record<string, ScriptModule> = {};
  const parts = names.map((name) => ({ name, ...folder.nativeWeights([name]) }));
  const checked = names.reduce((sum, n) => sum + folder.manifest.modules[n].bytes, 0);
  const total = checked + parts.reduce((sum, p) => sum + p.weights.tensors.reduce((s2, t) => s2 + t.nbytes, 0), 0);
  const report = progressReporter(options.onLoadProgress, total);
  report(checked);
  let done = checked;
  try {
    for (const { name, weights, modules: specs } of parts) {
      const before = done;
      modules[name] = await ScriptModule.loadWithWeights(specs[name].path, device, { weights, dtype, parameters: specs[name].parameters, fusedAttention: fused }, signal,
        (bound) => report(before + bound));
      done = before + weights.tensors.reduce((s2, t) => s2 + t.nbytes, 0);
    }
    report(total);
  } catch (e) {
    for (const m of Object.values(modules)) m.dispose();
    throw e;
  }
  return { folder, device, dtype, modules };
}

/** The one module of a folder that has the vision model and Q-Former: image_encoder.pt, or retrieval.pt for retrieval checkpoints. */
function visionModuleName(manifest: Manifest): string {
  return manifest.modules.image_encoder ? 'image_encoder' : 'retrieval';
}

function tensors(value: ScriptOutput, what: string): Tensor[] {
  const list = Array.isArray(value) ? value : [value];
  if (!list.every((v) => v instanceof Tensor)) throw new InternalError(`${what} returned something other than tensors`);
  return list as Tensor[];
}

function requireTensor(value: unknown, argument: string, rank: number, what: string): Tensor {
  if (!(value instanceof Tensor)) throw InvalidArgumentError.of(argument, value, `a Tensor ${what}`);
  if (value.disposed) throw new DisposedError(`argument '${argument}' is a Tensor that has been disposed`);
  if (value.shape.length !== rank) {
    throw new ShapeError(`argument '${argument}' has shape [${value.shape.join(', ')}]; expected ${what}`, { argument, value: `[${value.shape.join(', ')}]`, expected: what });
  }
  return value;
}

function requirePixels(value: unknown, manifest: Manifest, argument = 'inputs.pixelValues'): Tensor {
  const [h, w] = manifest.image_size ?? [0, 0];
  const pixels = requireTensor(value, argument, 4, `[B, 3, ${h}, ${w}] (Blip2Processor's pixelValues)`);
  if (pixels.shape[1] !== 3 || pixels.shape[2] !== h || pixels.shape[3] !== w || pixels.shape[0] < 1) {
    throw new ShapeError(`argument '${argument}' has shape [${pixels.shape.join(', ')}]; expected [B, 3, ${h}, ${w}] (the model's image size)`,
      { argument, value: `[${pixels.shape.join(', ')}]`, expected: `[B, 3, ${h}, ${w}]` });
  }
  if (!['float32', 'float16', 'bfloat16', 'float64'].includes(pixels.dtype)) {
    throw new DTypeError(`argument '${argument}' has dtype ${pixels.dtype}; expected a float dtype`, { argument, value: pixels.dtype, expected: 'float32, float16 or bfloat16' });
  }
  return pixels;
}

/** int64 ids [B, T] and their mask (all ones when absent), checked against each other and a length bound. */
async function requireText(inputIds: unknown, attentionMask: unknown, device: string, maxLength: number | undefined, limitName: string): Promise<[Tensor, Tensor]> {
  let ids = requireTensor(inputIds, 'inputs.inputIds', 2, '[B, T] of token ids');
  if (ids.dtype !== 'int64' && ids.dtype !== 'int32') {
    throw new DTypeError(`argument 'inputs.inputIds' has dtype ${ids.dtype}; expected int64`, { argument: 'inputs.inputIds', value: ids.dtype, expected: 'int64' });
  }
  const [b, t] = ids.shape;
  if (maxLength !== undefined && t > maxLength) {
    throw new InvalidArgumentError(`argument 'inputs.inputIds' has ${t} tokens per row; expected at most ${maxLength} (${limitName})`,
      { argument: 'inputs.inputIds', value: `${t} tokens`, expected: `at most ${maxLength}` });
  }
  if (ids.dtype !== 'int64') ids = await ids.to({ dtype: 'int64' });
  if (ids.device !== device) ids = await ids.to({ device });
  let mask: Tensor;
  if (attentionMask === undefined || attentionMask === null) {
    mask = Tensor.from(new BigInt64Array(b * t).fill(1n), [b, t], { device });
  } else {
    mask = requireTensor(attentionMask, 'inputs.attentionMask', 2, `[${b}, ${t}] of 0 and 1`);
    if (mask.shape[0] !== b || mask.shape[1] !== t) {
      throw new ShapeError(`argument 'inputs.attentionMask' has shape [${mask.shape.join(', ')}] but 'inputs.inputIds' has [${b}, ${t}]; expected the same shape`,
        { argument: 'inputs.attentionMask', value: `[${mask.shape.join(', ')}]`, expected: `[${b}, ${t}]` });
    }
    if (mask.dtype !== 'int64') mask = await mask.to({ dtype: 'int64' });
    if (mask.device !== device) mask = await mask.to({ device });
  }
  return [ids, mask];
}

/** Runs `body` with the call's AbortSignal; a result that arrives after an abort is disposed. */
function callWith<T>(options: CallOptions | undefined, body: () => Promise<T>, discard: (late: T) => void): Promise<T> {
  try {
    if (options !== undefined && (options === null || typeof options !== 'object')) throw InvalidArgumentError.of('options', options, 'an object');
    const signal = requireSignal(options?.signal, 'signal');
    return withAbort(signal, () => body(), discard);
  } catch (e) {
    return Promise.reject(e);
  }
}

function disposeAll(value: unknown): void {
  if (value instanceof Tensor) value.dispose();
  else if (value && typeof value === 'object') for (const v of Object.values(value)) disposeAll(v);
}

/** Base of the feature models: a folder's modules, disposal, device and dtype. */
abstract class FolderModel {
  readonly manifest: Manifest;
  readonly modelDir: string;
  readonly #modules: Record<string, ScriptModule>;
  readonly #device: string;
  readonly #dtype: NativeDType;

  protected constructor(loaded: LoadedModules) {
    this.manifest = loaded.folder.manifest;
    this.modelDir = loaded.folder.dir;
    this.#modules = loaded.modules;
    this.#device = loaded.device;
    this.#dtype = loaded.dtype;
  }

  /** 'cpu' or 'cuda:N'. */
  get device(): string {
    return this.#device;
  }
  /** The dtype the model runs in. */
  get dtype(): 'float32' | 'float16' | 'bfloat16' {
    return this.#dtype as 'float32' | 'float16' | 'bfloat16';
  }

  protected module(name: string): ScriptModule {
    const m = this.#modules[name];
    if (!m) throw new InternalError(`no module ${name}`);
    return m;
  }

  /** Frees the model's modules (their weights go once no running call uses them). */
  async dispose(): Promise<void> {
    for (const m of Object.values(this.#modules)) m.dispose();
  }

  /** dispose(), for `using` declarations. */
  [Symbol.dispose](): void {
    void this.dispose();
  }

  /** dispose(), for `await using` declarations. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }
}

/** transformers' Blip2VisionModel: the ViT image encoder. */
export class Blip2VisionModel extends FolderModel {
  private constructor(loaded: LoadedModules) {
    super(loaded);
  }

  /** Loads the vision model of a folder that serves Blip2VisionModel (any BLIP-2 folder with images). */
  static async fromPretrained(modelDir: string, options: FeatureModelOptions = {}): Promise<Blip2VisionModel> {
    const folder = await readModelFolder(modelDir);
    return new Blip2VisionModel(await loadModules(modelDir, 'Blip2VisionModel', [visionModuleName(folder.manifest)], options));
  }

  /** `{ lastHiddenState [B, P+1, Dv], poolerOutput [B, Dv] }` for `pixelValues` [B, 3, H, W]. */
  forward(inputs: { pixelValues: Tensor }, options?: CallOptions): Promise<ModelOutputWithPooling> {
    return callWith(options, async () => {
      const pixels = requirePixels(inputs?.pixelValues, this.manifest);
      const [lastHiddenState, poolerOutput] = tensors(await this.module(visionModuleName(this.manifest)).call('vision_model', [pixels]), 'vision_model');
      return { lastHiddenState, poolerOutput };
    }, disposeAll);
  }
}

/** transformers' Blip2QFormerModel: the Querying Transformer over image features. */
export class Blip2QFormerModel extends FolderModel {
  private constructor(loaded: LoadedModules) {
    super(loaded);
  }

  /** Loads the Q-Former of a folder that serves Blip2QFormerModel. */
  static async fromPretrained(modelDir: string, options: FeatureModelOptions = {}): Promise<Blip2QFormerModel> {
    const folder = await readModelFolder(modelDir);
    return new Blip2QFormerModel(await loadModules(modelDir, 'Blip2QFormerModel', [visionModuleName(folder.manifest)], options));
  }

  /**
   * transformers' Blip2QFormerModel.forward with query embeddings: every position is a query
   * (cross-attends the image). `encoderAttentionMask` [B, P] defaults to all ones.
   * Returns `{ lastHiddenState [B, Q, Dq], poolerOutput [B, Dq] }` (float32 when the Q-Former is kept in float32).
   */
  forward(inputs: { queryEmbeds: Tensor; encoderHiddenStates: Tensor; encoderAttentionMask?: Tensor }, options?: CallOptions): Promise<ModelOutputWithPooling> {
    return callWith(options, async () => {
      if (inputs === null || typeof inputs !== 'object') throw InvalidArgumentError.of('inputs', inputs, 'an object { queryEmbeds, encoderHiddenStates, encoderAttentionMask? }');
      const q = this.manifest.qformer;
      const query = requireTensor(inputs.queryEmbeds, 'inputs.queryEmbeds', 3, `[B, Q, ${q.hidden_size}]`);
      const encoder = requireTensor(inputs.encoderHiddenStates, 'inputs.encoderHiddenStates', 3, `[B, P, ${q.encoder_hidden_size ?? this.manifest.vision?.hidden_size}]`);
      if (query.shape[2] !== q.hidden_size) {
        throw new ShapeError(`argument 'inputs.queryEmbeds' has shape [${query.shape.join(', ')}]; expected [B, Q, ${q.hidden_size}] (the Q-Former's hidden size)`,
          { argument: 'inputs.queryEmbeds', value: `[${query.shape.join(', ')}]`, expected: `[B, Q, ${q.hidden_size}]` });
      }
      const width = q.encoder_hidden_size ?? this.manifest.vision?.hidden_size;
      if (encoder.shape[0] !== query.shape[0] || (width !== undefined && encoder.shape[2] !== width)) {
        throw new ShapeError(`argument 'inputs.encoderHiddenStates' has shape [${encoder.shape.join(', ')}]; expected [${query.shape[0]}, P, ${width}] (one row per query row, the vision width)`,
          { argument: 'inputs.encoderHiddenStates', value: `[${encoder.shape.join(', ')}]`, expected: `[${query.shape[0]}, P, ${width}]` });
      }
      let mask: Tensor;
      if (inputs.encoderAttentionMask === undefined || inputs.encoderAttentionMask === null) {
        mask = Tensor.from(new BigInt64Array(encoder.shape[0] * encoder.shape[1]).fill(1n), [encoder.shape[0], encoder.shape[1]], { device: this.device });
      } else {
        mask = requireTensor(inputs.encoderAttentionMask, 'inputs.encoderAttentionMask', 2, `[${encoder.shape[0]}, ${encoder.shape[1]}]`);
        if (mask.shape[0] !== encoder.shape[0] || mask.shape[1] !== encoder.shape[1]) {
          throw new ShapeError(`argument 'inputs.encoderAttentionMask' has shape [${mask.shape.join(', ')}]; expected [${encoder.shape[0]}, ${encoder.shape[1]}]`,
            { argument: 'inputs.encoderAttentionMask', value: `[${mask.shape.join(', ')}]`, expected: `[${encoder.shape[0]}, ${encoder.shape[1]}]` });
        }
        if (mask.dtype !== 'int64') mask = await mask.to({ dtype: 'int64' });
      }
      const [lastHiddenState, poolerOutput] = tensors(await this.module(visionModuleName(this.manifest)).call('qformer_forward', [query, encoder, mask]), 'qformer_forward');
      return { lastHiddenState, poolerOutput };
    }, disposeAll);
  }
}

/** transformers' Blip2Model: the whole model with its feature methods (no generation; see Blip2ForConditionalGeneration). */
export class Blip2Model {
  readonly manifest: Manifest;
  readonly #native: NativeBlip2Model;
  readonly #imageEncoder: ScriptModule;
  readonly #languageModel: ScriptModule;

  private constructor(native: NativeBlip2Model, manifest: Manifest) {
    this.#native = native;
    this.manifest = manifest;
    const { imageEncoder, languageModel } = native.modules();
    this.#imageEncoder = ScriptModule.fromNative(imageEncoder);
    this.#languageModel = ScriptModule.fromNative(languageModel);
  }

  /** Loads a folder that serves Blip2Model (OPT and Flan-T5 BLIP-2 checkpoints). */
  static async fromPretrained(modelDir: string, options: FeatureModelOptions = {}): Promise<Blip2Model> {
    // The same runtime as captioning (its modules, weights and forward), with a one-slot cache:
    // Blip2Model does not generate.
    const { native, folder } = await loadRuntime(modelDir, { ...options, maxBatchSize: 1 }, 'Blip2Model');
    return new Blip2Model(native, folder.manifest);
  }

  /** 'cpu' or 'cuda:N'. */
  get device(): string {
    return this.#native.device;
  }

  /** transformers' get_image_features (5.x): the vision model's outputs. */
  getImageFeatures(inputs: { pixelValues: Tensor }, options?: CallOptions): Promise<ModelOutputWithPooling> {
    return callWith(options, async () => {
      const pixels = requirePixels(inputs?.pixelValues, this.manifest);
      const [lastHiddenState, poolerOutput] = tensors(await this.#imageEncoder.call('vision_model', [pixels]), 'vision_model');
      return { lastHiddenState, poolerOutput };
    }, disposeAll);
  }

  /** transformers' get_qformer_features: the Q-Former's query outputs, `{ lastHiddenState [B, Q, Dq], poolerOutput [B, Dq] }`. */
  getQformerFeatures(inputs: { pixelValues: Tensor }, options?: CallOptions): Promise<ModelOutputWithPooling> {
    return callWith(options, async () => {
      const pixels = requirePixels(inputs?.pixelValues, this.manifest);
      const [vision, visionPooled] = tensors(await this.#imageEncoder.call('vision_model', [pixels]), 'vision_model');
      visionPooled.dispose();
      const [lastHiddenState] = tensors(await this.#imageEncoder.call('qformer', [vision]), 'qformer');
      vision.dispose();
      // transformers' Q-Former pooler output is the first query's hidden state.
      const poolerOutput = await lastHiddenState.select(1, 0);
      return { lastHiddenState, poolerOutput };
    }, disposeAll);
  }

  /**
   * transformers' get_text_features (5.x): the language model's last hidden states for the text
   * alone, `{ lastHiddenState [B, T, E] }` (T5: its encoder's). Positions the mask hides hold no
   * meaningful values.
   */
  getTextFeatures(inputs: { inputIds: Tensor; attentionMask?: Tensor }, options?: CallOptions): Promise<{ lastHiddenState: Tensor }> {
    return callWith(options, async () => {
      if (inputs === null || typeof inputs !== 'object') throw InvalidArgumentError.of('inputs', inputs, 'an object { inputIds, attentionMask? }');
      const [ids, mask] = await requireText(inputs.inputIds, inputs.attentionMask, this.device, this.manifest.max_length, "the language model's positions");
      const [lastHiddenState] = tensors(await this.#languageModel.call('text_hidden_states', [ids, mask]), 'text_hidden_states');
      return { lastHiddenState };
    }, disposeAll);
  }

  /**
   * transformers' Blip2Model.forward: `logits` (as Blip2ForConditionalGeneration.forward) with
   * the vision and Q-Former outputs.
   */
  forward(inputs: Blip2Inputs, options?: CallOptions): Promise<{ logits: Tensor<'float32'>; visionOutputs: ModelOutputWithPooling; qformerOutputs: ModelOutputWithPooling }> {
    return callWith(options, async () => {
      const [pixels, ids, mask] = nativeInputs(inputs);
      const decoder = inputs.decoderInputIds ? Tensor.native(inputs.decoderInputIds, 'inputs.decoderInputIds') : null;
      const logits = Tensor.fromNative<'float32'>(await this.#native.forward(pixels, ids, mask, decoder));
      const visionOutputs = await this.getImageFeatures({ pixelValues: inputs.pixelValues });
      const qformerOutputs = await this.getQformerFeatures({ pixelValues: inputs.pixelValues });
      return { logits, visionOutputs, qformerOutputs };
    }, disposeAll);
  }

  /** Frees the model (see Blip2ForConditionalGeneration.dispose). */
  dispose(): Promise<void> {
    this.#imageEncoder.dispose();
    this.#languageModel.dispose();
    return this.#native.dispose();
  }

  /** dispose(), for `using` declarations. */
  [Symbol.dispose](): void {
    void this.dispose();
  }

  /** dispose(), for `await using` declarations. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }
}

/** Strips the num_query_tokens <image> ids a Blip2Processor puts before each text, as transformers' retrieval models do. */
async function textOnly(ids: Tensor, mask: Tensor, manifest: Manifest): Promise<[Tensor, Tensor]> {
  const q = manifest.num_query_tokens;
  const image = manifest.image_token_index;
  if (image === null || ids.shape[1] < q) return [ids, mask];
  const rows = (await ids.toList()) as unknown as bigint[];
  const width = ids.shape[1];
  const leading = Array.from({ length: ids.shape[0] }, (_, r) => rows.slice(r * width, r * width + q).every((v) => Number(v) === image));
  if (leading.every((x) => x)) return [await ids.narrow(1, q, width - q), await mask.narrow(1, q, width - q)];
  if (leading.some((x) => x)) {
    throw new InvalidArgumentError(`argument 'inputs.inputIds' has ${q} <image> tokens in front of some rows only; expected all rows with them (Blip2Processor) or none`,
      { argument: 'inputs.inputIds', expected: 'the same layout in every row' });
  }
  return [ids, mask];
}

/** What Blip2ForImageTextRetrieval.forward returns (transformers' Blip2ImageTextMatchingModelOutput). */
export interface ImageTextRetrievalOutput {
  /** ITM: [B, 2] float32 (not-match, match) logits per image-text pair; ITC: [B, Bt] similarities (max over queries). */
  logitsPerImage: Tensor<'float32'>;
  /** Its transpose. */
  logitsPerText: Tensor<'float32'>;
  /** ITC only: [Bt, Dp] normalised text embeddings (the [CLS] row). */
  textEmbeds?: Tensor;
  /** ITC only: [B, Q, Dp] normalised query embeddings of each image. */
  imageEmbeds?: Tensor;
}

/**
 * transformers' Blip2ForImageTextRetrieval: image-text matching (the ITM head) and contrastive
 * similarity (ITC), plus rank() for N texts against M images.
 */
export class Blip2ForImageTextRetrieval extends FolderModel {
  private constructor(loaded: LoadedModules) {
    super(loaded);
  }

  /** Loads a folder exported from a Blip2ForImageTextRetrieval checkpoint. */
  static async fromPretrained(modelDir: string, options: FeatureModelOptions = {}): Promise<Blip2ForImageTextRetrieval> {
    return new Blip2ForImageTextRetrieval(await loadModules(modelDir, 'Blip2ForImageTextRetrieval', ['retrieval'], options));
  }

  async #text(inputs: { inputIds: Tensor; attentionMask?: Tensor }): Promise<[Tensor, Tensor]> {
    if (inputs === null || typeof inputs !== 'object') throw InvalidArgumentError.of('inputs', inputs, 'an object { inputIds, attentionMask? }');
    const [ids, mask] = await requireText(inputs.inputIds, inputs.attentionMask, this.device, undefined, '');
    const [textIds, textMask] = await textOnly(ids, mask, this.manifest);
    const limit = this.manifest.qformer.max_position_embeddings;
    if (limit !== undefined && textIds.shape[1] > limit) {
      throw new InvalidArgumentError(`argument 'inputs.inputIds' has ${textIds.shape[1]} text tokens per row; expected at most ${limit} (the Q-Former's max_position_embeddings)`,
        { argument: 'inputs.inputIds', value: `${textIds.shape[1]} tokens`, expected: `at most ${limit}` });
    }
    return [textIds, textMask];
  }

  /**
   * transformers' forward. With `useImageTextMatchingHead` (ITM): one text per image (B == Bt),
   * `logitsPerImage` [B, 2]. Without (ITC, the default as in transformers): any Bt texts against
   * the B images, `logitsPerImage` [B, Bt] with `textEmbeds` and `imageEmbeds`.
   */
  forward(inputs: { pixelValues: Tensor; inputIds: Tensor; attentionMask?: Tensor; useImageTextMatchingHead?: boolean }, options?: CallOptions): Promise<ImageTextRetrievalOutput> {
    return callWith(options, async () => {
      const pixels = requirePixels(inputs?.pixelValues, this.manifest);
      const [ids, mask] = await this.#text(inputs);
      const itm = inputs.useImageTextMatchingHead ?? false;
      if (typeof itm !== 'boolean') throw InvalidArgumentError.of('inputs.useImageTextMatchingHead', itm, 'a boolean');
      if (itm && ids.shape[0] !== pixels.shape[0]) {
        throw new ShapeError(`argument 'inputs.inputIds' has ${ids.shape[0]} rows but 'inputs.pixelValues' has ${pixels.shape[0]} images; the matching head scores one text per image (use rank() for every pair)`,
          { argument: 'inputs.inputIds', value: String(ids.shape[0]), expected: String(pixels.shape[0]) });
      }
      const m = this.module('retrieval');
      const [vision, pooled] = tensors(await m.call('vision_model', [pixels]), 'vision_model');
      pooled.dispose();
      try {
        if (itm) {
          const [logitsPerImage] = tensors(await m.call('itm', [vision, ids, mask]), 'itm');
          return { logitsPerImage: logitsPerImage as Tensor<'float32'>, logitsPerText: await transposed(logitsPerImage) };
        }
        const [logitsPerImage, logitsPerText, textEmbeds, imageEmbeds] = tensors(await m.call('itc', [vision, ids, mask]), 'itc');
        return { logitsPerImage: logitsPerImage as Tensor<'float32'>, logitsPerText: logitsPerText as Tensor<'float32'>, textEmbeds, imageEmbeds };
      } finally {
        vision.dispose();
      }
    }, disposeAll);
  }

  /**
   * Scores every text against every image: [M images, N texts] float32. `'itc'` (default): the
   * contrastive similarity (max over query tokens); `'itm'`: the matching head's probability of
   * "match" (softmax), M x N pairs through the Q-Former in one call.
   */
  rank(images: { pixelValues: Tensor }, texts: { inputIds: Tensor; attentionMask?: Tensor }, options: CallOptions & { method?: 'itc' | 'itm' } = {}): Promise<Tensor<'float32'>> {
    return callWith(options, async () => {
      const method = options.method ?? 'itc';
      if (method !== 'itc' && method !== 'itm') throw InvalidArgumentError.of('options.method', method, "'itc' or 'itm'");
      const pixels = requirePixels(images?.pixelValues, this.manifest, 'images.pixelValues');
      const [ids, mask] = await this.#text(texts);
      const m = this.module('retrieval');
      const [vision, pooled] = tensors(await m.call('vision_model', [pixels]), 'vision_model');
      pooled.dispose();
      try {
        if (method === 'itc') {
          const [logitsPerImage, logitsPerText, textEmbeds, imageEmbeds] = tensors(await m.call('itc', [vision, ids, mask]), 'itc');
          for (const t of [logitsPerText, textEmbeds, imageEmbeds]) t.dispose();
          return logitsPerImage as Tensor<'float32'>;
        }
        const [pairs] = tensors(await m.call('itm_pairs', [vision, ids, mask]), 'itm_pairs');  // [M, N, 2]
        const probability = await matchProbability(pairs);
        pairs.dispose();
        return probability;
      } finally {
        vision.dispose();
      }
    }, (late) => late.dispose());
  }
}

/** [a, b] → [b, a] (through the host: retrieval outputs are small). */
async function transposed(t: Tensor): Promise<Tensor<'float32'>> {
  const [a, b] = t.shape;
  const data = (await (t.dtype === 'float32' ? t : await t.to({ dtype: 'float32' })).toArray()) as Float32Array;
  const out = new Float32Array(a * b);
  for (let i = 0; i < a; i++) for (let j = 0; j < b; j++) out[j * a + i] = data[i * b + j];
  return Tensor.from(out, [b, a], { device: t.device }) as Tensor<'float32'>;
}

/** softmax over the last dimension of [M, N, 2] logits, index 1 (match): [M, N]. */
async function matchProbability(pairs: Tensor): Promise<Tensor<'float32'>> {
  const [m, n] = pairs.shape;
  const data = (await (pairs.dtype === 'float32' ? pairs : await pairs.to({ dtype: 'float32' })).toArray()) as Float32Array;
  const out = new Float32Array(m * n);
  for (let k = 0; k < m * n; k++) {
    const a = data[2 * k];
    const b = data[2 * k + 1];
    const top = Math.max(a, b);
    out[k] = Math.exp(b - top) / (Math.exp(a - top) + Math.exp(b - top));
  }
  return Tensor.from(out, [m, n], { device: pairs.device }) as Tensor<'float32'>;
}

/** transformers' Blip2TextModelWithProjection: normalised text embeddings in the image-text space. */
export class Blip2TextModelWithProjection extends FolderModel {
  private constructor(loaded: LoadedModules) {
    super(loaded);
  }

  /** Loads a folder that serves Blip2TextModelWithProjection (retrieval checkpoints). */
  static async fromPretrained(modelDir: string, options: FeatureModelOptions = {}): Promise<Blip2TextModelWithProjection> {
    return new Blip2TextModelWithProjection(await loadModules(modelDir, 'Blip2TextModelWithProjection', ['retrieval'], options));
  }

  /** `{ textEmbeds [B, T, Dp] (each token's, normalised; [:, 0] is the ITC embedding), lastHiddenState [B, T, Dq] }`. */
  forward(inputs: { inputIds: Tensor; attentionMask?: Tensor }, options?: CallOptions): Promise<{ textEmbeds: Tensor; lastHiddenState: Tensor }> {
    return callWith(options, async () => {
      if (inputs === null || typeof inputs !== 'object') throw InvalidArgumentError.of('inputs', inputs, 'an object { inputIds, attentionMask? }');
      const [ids, mask] = await requireText(inputs.inputIds, inputs.attentionMask, this.device, undefined, '');
      const [textIds, textMask] = await textOnly(ids, mask, this.manifest);
      const limit = this.manifest.qformer.max_position_embeddings;
      if (limit !== undefined && textIds.shape[1] > limit) {
        throw new InvalidArgumentError(`argument 'inputs.inputIds' has ${textIds.shape[1]} text tokens per row; expected at most ${limit} (the Q-Former's max_position_embeddings)`,
          { argument: 'inputs.inputIds', value: `${textIds.shape[1]} tokens`, expected: `at most ${limit}` });
      }
      const [textEmbeds, lastHiddenState] = tensors(await this.module('retrieval').call('text_embeds', [textIds, textMask]), 'text_embeds');
      return { textEmbeds, lastHiddenState };
    }, disposeAll);
  }
}

/** transformers' Blip2VisionModelWithProjection: normalised query embeddings of each image in the image-text space. */
export class Blip2VisionModelWithProjection extends FolderModel {
  private constructor(loaded: LoadedModules) {
    super(loaded);
  }

  /** Loads a folder that serves Blip2VisionModelWithProjection (retrieval checkpoints). */
  static async fromPretrained(modelDir: string, options: FeatureModelOptions = {}): Promise<Blip2VisionModelWithProjection> {
    return new Blip2VisionModelWithProjection(await loadModules(modelDir, 'Blip2VisionModelWithProjection', ['retrieval'], options));
  }

  /** `{ imageEmbeds [B, Q, Dp] (normalised), lastHiddenState [B, P+1, Dv] (the vision model's, as transformers) }`. */
  forward(inputs: { pixelValues: Tensor }, options?: CallOptions): Promise<{ imageEmbeds: Tensor; lastHiddenState: Tensor }> {
    return callWith(options, async () => {
      const pixels = requirePixels(inputs?.pixelValues, this.manifest);
      const m = this.module('retrieval');
      const [lastHiddenState, pooled] = tensors(await m.call('vision_model', [pixels]), 'vision_model');
      pooled.dispose();
      const [imageEmbeds, queries] = tensors(await m.call('image_embeds', [lastHiddenState]), 'image_embeds');
      queries.dispose();
      return { imageEmbeds, lastHiddenState };
    }, disposeAll);
  }
}
