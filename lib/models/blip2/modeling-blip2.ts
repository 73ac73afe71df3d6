// Blip2ForConditionalGeneration (OPT language models): captioning and visual question answering.
import type { NativeBlip2Model, NativeCancelToken, NativeDType, NativeLinearDecision, NativeStepEvent } from '../../../typings/binding';
import { AbortError, InvalidArgumentError } from '../../errors';
import { type GenerateOptions, type GenerationStep, resolveGenerateOptions } from '../../generation/options';
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
}

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
      }, token),
      (late) => late.dispose(),
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
    try {
      resolved = resolveGenerateOptions(options, {
        generationConfig: this.generationConfig,
        eosTokenIds: this.manifest.special_tokens.eos_token_id ?? [],
        padTokenId: this.manifest.special_tokens.pad_token_id,
        vocabSize: this.manifest.vocab_size,
      });
    } catch (e) {
      return Promise.reject(e);
    }
    // A throwing onStep aborts the generation and its error is what generate() rejects with.
    const stepController = new AbortController();
    let stepError: unknown;
    const userOnStep = options.onStep;
    const onStep = userOnStep
      ? (event: NativeStepEvent): void => {
          if (stepError !== undefined) return;
          try {
            userOnStep(event as GenerationStep);
          } catch (e) {
            stepError = e;
            stepController.abort();
          }
        }
      : null;
    const signals = [options.signal, stepController.signal].filter((s): s is AbortSignal => s !== undefined);
    const signal = signals.length === 1 ? signals[0] : AbortSignal.any(signals);
    const result = this.#run(signal, async (token) => {
      const [pixels, ids, mask] = nativeInputs(inputs);
      const out = await this.#native.generate(pixels, ids, mask, resolved, onStep, token);
      return {
        sequences: Tensor.fromNative<'int64'>(out.sequences),
        sequencesScores: out.sequencesScores ? Tensor.fromNative<'float32'>(out.sequencesScores) : null,
      };
    }, (late) => {
      late.sequences.dispose();
      late.sequencesScores?.dispose();
    });
    const withStepErrors = result.catch((e: unknown) => {
      throw stepError !== undefined && e instanceof AbortError ? stepError : e;
    });
    if (options.returnDictInGenerate) return withStepErrors;
    return withStepErrors.then((out) => {
      out.sequencesScores?.dispose();
      return out.sequences;
    });
  }

  /** Frees the model's weights (after the calls already running finish). */
  dispose(): void {
    this.#native.dispose();
  }

  /** dispose(), for `using` declarations. */
  [Symbol.dispose](): void {
    this.dispose();
  }

  #run<T>(signal: AbortSignal | undefined, run: (token: NativeCancelToken | undefined) => Promise<T>, discard?: (late: T) => void): Promise<T> {
    try {
      return withAbort(requireSignal(signal, 'signal'), run, discard);
    } catch (e) {
      return Promise.reject(e);
    }
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
