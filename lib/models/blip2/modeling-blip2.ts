// Blip2ForConditionalGeneration (OPT language models): captioning and visual question answering.
import type {
  NativeBlip2Model, NativeCancelToken, NativeDType, NativeLinearDecision, NativeModelStats, NativeStepEvent,
} from '../../../typings/binding';
import { AbortError, DisposedError, InvalidArgumentError } from '../../errors';
import { type GenerateOptions, type GenerationStep, resolveGenerateOptions } from '../../generation/options';
import { TextStreamer, type TokenDelta } from '../../generation/streaming';
import { PreTrainedTokenizer } from '../../processing/tokenizer';
import { binding } from '../../native/binding';
import { requireSignal, withAbort } from '../../runtime/abort';
import { requireDeviceString } from '../../runtime/device';
import { Tensor } from '../../tensor/tensor';
import { type Manifest, readModelFolder } from '../model-folder';
import type { Blip2Config, GenerationConfig } from './configuration';

/** Options of Blip2ForConditionalGeneration.fromPretrained(). */
export interface FromPretrainedOptions {
  /** 'cpu' (default), 'cuda' or 'cuda:N'. */
  device?: string;
  /** Run in another dtype than the export's (e.g. a float32 export in 'bfloat16'); default: the export's dtype (manifest.json). */
  dtype?: 'float32' | 'float16' | 'bfloat16';
  /** Aborts the load; fromPretrained() then rejects with AbortError (default: none). */
  signal?: AbortSignal;
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
  /** Prompt tokens written into the cache per scheduler cycle, so long prompts interleave with decoding. Default 64 on the CPU, 512 on CUDA. */
  prefillChunk?: number;
}

/** Live figures of one loaded model's scheduler (model.stats()). */
export type ModelStats = NativeModelStats;

/** The inputs of generate() and forward(): what Blip2Processor.process() returns. */
export interface Blip2Inputs {
  /** [B, 3, H, W] float (Blip2Processor's pixelValues). */
  pixelValues: Tensor;
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
    if (options === null || typeof options !== 'object') throw InvalidArgumentError.of('options', options, 'an object');
    const device = requireDeviceString(options.device ?? 'cpu', 'device');
    const signal = requireSignal(options.signal, 'signal');
    if (options.dtype !== undefined && !['float32', 'float16', 'bfloat16'].includes(options.dtype)) {
      throw InvalidArgumentError.of('dtype', options.dtype, "'float32', 'float16' or 'bfloat16'");
    }
    const folder = await readModelFolder(modelDir);
    const { manifest } = folder;
    if (manifest.architecture !== 'opt') {
      throw InvalidArgumentError.of('modelDir', modelDir, `a model folder of architecture 'opt' (this one is '${manifest.architecture}')`);
    }
    const dtype: NativeDType = options.dtype ?? manifest.dtype;
    const bos = manifest.special_tokens.bos_token_id ?? 0;
    const scheduler = schedulerOptions(options, manifest, dtype, device);
    const { weights, modules } = folder.nativeWeights(['image_encoder', 'language_model']);
    const native = await withAbort(
      signal,
      (token) => NativeModel.load({
        architecture: 'opt',
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
        imageHeight: manifest.image_size[0],
        imageWidth: manifest.image_size[1],
        imageTokenIndex: manifest.image_token_index,
        bosTokenId: bos,
      }, scheduler, token),
      (late) => void late.dispose(),
    );
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
   * What the load-time timing chose for each weight shape of the language model on this CPU: the
   * runtime's one-row product kernel, or libtorch's (empty on other devices or with
   * BLIP2_LINEAR_KERNEL=off).
   */
  get linearKernels(): NativeLinearDecision[] {
    return this.#native.linearKernels;
  }

  /** Query embeddings in the language model's space, [B, num_query_tokens, hidden] (vision → Q-Former → projection). */
  getImageFeatures(pixelValues: Tensor, options: { signal?: AbortSignal } = {}): Promise<Tensor> {
    return this.#run(options.signal, async (token) => Tensor.fromNative(await this.#native.encodeImages(Tensor.native(pixelValues, 'pixelValues'), token)));
  }

  /** transformers' forward: `logits` [B, T, V] over every position (image positions included). */
  forward(inputs: Blip2Inputs, options: { signal?: AbortSignal } = {}): Promise<{ logits: Tensor<'float32'> }> {
    return this.#run(options.signal, async (token) => {
      const [pixels, ids, mask] = nativeInputs(inputs);
      return { logits: Tensor.fromNative<'float32'>(await this.#native.forward(pixels, ids, mask, token)) };
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

const DEFAULT_KV_CACHE_MAX_BYTES = 8 * 1024 ** 3;
const DTYPE_BYTES: Record<string, number> = { float32: 4, float16: 2, bfloat16: 2 };

function positiveInteger(name: string, value: unknown, fallback: number, min = 1): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min) throw InvalidArgumentError.of(name, value, `an integer >= ${min}`);
  return value;
}

/** The scheduler's options from fromPretrained's, with the KV cache sized within kvCacheMaxBytes. */
function schedulerOptions(options: FromPretrainedOptions, manifest: Manifest, dtype: NativeDType, device: string) {
  const maxLength = positiveInteger('maxLength', options.maxLength, Math.min(manifest.max_length, 512), manifest.num_query_tokens + 2);
  if (maxLength > manifest.max_length) {
    throw InvalidArgumentError.of('maxLength', maxLength, `at most ${manifest.max_length} (the export's max_length)`);
  }
  const maxBatchSize = positiveInteger('maxBatchSize', options.maxBatchSize, 16);
  const maxQueue = positiveInteger('maxQueue', options.maxQueue, 1024, 0);
  const prefillChunk = positiveInteger('prefillChunk', options.prefillChunk, device === 'cpu' ? 64 : 512);
  const kvCacheMaxBytes = positiveInteger('kvCacheMaxBytes', options.kvCacheMaxBytes, DEFAULT_KV_CACHE_MAX_BYTES);
  const lm = manifest.language_model;
  const bytesPerSlot = lm.num_layers * 2 * lm.num_heads * maxLength * lm.head_dim * DTYPE_BYTES[dtype];
  const slots = Math.min(maxBatchSize, Math.floor(kvCacheMaxBytes / bytesPerSlot));
  if (slots < 1) {
    throw InvalidArgumentError.of('kvCacheMaxBytes', kvCacheMaxBytes,
      `at least ${bytesPerSlot} (one sequence of maxLength ${maxLength} needs that much KV cache; lower maxLength or raise kvCacheMaxBytes)`);
  }
  return { slots, maxLength, maxQueue, prefillChunk };
}

function nativeInputs(inputs: Blip2Inputs) {
  if (inputs === null || typeof inputs !== 'object') throw InvalidArgumentError.of('inputs', inputs, 'an object { pixelValues, inputIds?, attentionMask? }');
  return [
    Tensor.native(inputs.pixelValues, 'inputs.pixelValues'),
    inputs.inputIds === undefined || inputs.inputIds === null ? null : Tensor.native(inputs.inputIds, 'inputs.inputIds'),
    inputs.attentionMask === undefined || inputs.attentionMask === null ? null : Tensor.native(inputs.attentionMask, 'inputs.attentionMask'),
  ] as const;
}
