// Blip2Processor: BlipImageProcessor + the checkpoint's tokenizer, with transformers' image-token
// expansion (`num_query_tokens` copies of <image> before each row's tokenized text).
//
// Choices, where transformers leaves room (see also test/processor.spec.ts):
// - Rows are built as later transformers versions build them: each row is `[<image>] * numQueryTokens`
//   followed by that row's tokenized (and padded) text. 4.45.1 keeps only the first text of a
//   batch (a zip bug; test/fixtures/README.md item 6): that is not copied. With left padding the
//   pads therefore sit between the image tokens and the BOS, exactly as in transformers.
// - `maxLength` (truncation / padding 'max_length') counts the text tokens only, special tokens
//   included and image tokens excluded, as in transformers 4.45.1 (the fixtures' version). The
//   newest transformers main branch subtracts numQueryTokens from max_length instead (so there it
//   bounds the whole row); to get that, pass maxLength - numQueryTokens.
// - `maxLength` and `padToMultipleOf` are at most `maxLengthBound`: the text tokens the language
//   model holds beside its query tokens (see Blip2Processor.maxLengthBound). Without maxLength,
//   truncation and padding 'max_length' use model_max_length capped at that bound.
// - Image tokens are added only when images are given (text-only calls give plain text ids), as
//   newer transformers versions do (4.45.1 adds them to text-only calls too).
// - One text per image. A single string with several images is applied to every image (each row
//   is what transformers gives for that image alone; transformers itself would return one text
//   row for N images, which its model then rejects). A text array must match the image count:
//   more texts than images, or fewer (but more than zero), is an InvalidArgumentError.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { InvalidArgumentError, ModelLoadError, describeValue } from '../errors';
import { requireSignal } from '../runtime/abort';
import { Tensor } from '../tensor/tensor';
import { integer, integerRange, isInteger } from '../validation';
import type { ImageInput } from './image-decode';
import { BlipImageProcessor, type PixelDType, throwIfAborted } from './image-processor';
import { TEXT_LIMITS } from './tokenizer-core';
import { type DecodeOptions, type PaddingStrategy, PreTrainedTokenizer, type TokenIds, type TruncationStrategy, encodeForProcessor } from './tokenizer';

/** The image placeholder token put before the text of each row. */
export const IMAGE_TOKEN = '<image>';

/** Options of Blip2Processor.process(). */
export interface ProcessOptions {
  /** One image or an array: encoded bytes (Buffer/Uint8Array), a file path, or raw pixels { data, width, height, channels }; default none (text only). */
  images?: ImageInput | readonly ImageInput[];
  /** One text (applied to every image) or one text per image; default none (images only: pixel values only). */
  text?: string | readonly string[];
  /** Pad the rows to one length (default false: none; the texts must then tokenize to one length). */
  padding?: PaddingStrategy;
  /** Truncate to maxLength (default: only when maxLength is given without padding, as transformers). */
  truncation?: TruncationStrategy;
  /** Text tokens only (image tokens not counted), see the note at the top of this file; default: the tokenizer's model_max_length where a limit is needed. */
  maxLength?: number;
  /** Pad the length up to a multiple of this (default: no rounding). */
  padToMultipleOf?: number;
  /** Overrides the tokenizer's padding side (tokenizer_config.json's padding_side) for this call; default: the tokenizer's. */
  paddingSide?: 'left' | 'right';
  /** Add the tokenizer's special tokens (OPT: a leading </s>); default true. */
  addSpecialTokens?: boolean;
  /** Where the tensors are made; default 'cpu'. */
  device?: string;
  /** Pixel values' dtype; default the model's dtype (manifest.json) or float32. */
  dtype?: PixelDType;
  /** Aborts the call (default: none). */
  signal?: AbortSignal;
  /** Apply EXIF orientation (transformers does not); default false. */
  autoOrient?: boolean;
  /** Reject images with more pixels; default 100,000,000. */
  maxPixels?: number;
  /** Reject calls whose images have more pixels together; default max(100,000,000, maxPixels). */
  maxTotalPixels?: number;
}

/** What Blip2Processor.process() returns for images and text: the inputs of generate(). */
export interface Blip2ProcessorOutput {
  /** [B, 3, H, W] */
  pixelValues: Tensor;
  /** int64 [B, L] */
  inputIds: Tensor;
  /** int64 [B, L] */
  attentionMask: Tensor;
}

type Images = ImageInput | readonly ImageInput[];
type EncodedRows = Awaited<ReturnType<PreTrainedTokenizer[typeof encodeForProcessor]>>;
type Texts = string | readonly string[];

interface ManifestInfo {
  num_query_tokens?: number | null;
  image_token_index?: number | null;
  architecture?: string;
  dtype?: string;
}

function readJsonIfExists(file: string): Record<string, unknown> | undefined {
  if (!fs.existsSync(file)) return undefined;
  try {
    const value = JSON.parse(fs.readFileSync(file, 'utf8')) as unknown;
    if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new Error('not a JSON object');
    return value as Record<string, unknown>;
  } catch (error) {
    throw new ModelLoadError(`${file} is not valid JSON: ${(error as Error).message}`, { file });
  }
}

/** transformers' Blip2Processor: BlipImageProcessor for the images, the checkpoint's tokenizer for the text. */
export class Blip2Processor {
  readonly imageProcessor: BlipImageProcessor;
  readonly tokenizer: PreTrainedTokenizer;
  /** Copies of <image> put before each row's text; null for pre-4.45 (legacy) checkpoints. */
  readonly numQueryTokens: number | null;
  readonly imageToken = IMAGE_TOKEN;
  /** The id of <image> (added after the vocabulary when the tokenizer lacks it, as transformers does). */
  readonly imageTokenId: number;
  /** Default dtype of pixel values. */
  readonly dtype: PixelDType;
  /**
   * The largest `maxLength` / `padToMultipleOf` of a call: the text tokens the language model
   * holds beside its query tokens. options.maxLengthBound, else the tokenizer's (fromPretrained:
   * the smaller of model_max_length and the model's positions less its query tokens).
   */
  readonly maxLengthBound: number;
  /** Set when the bound is the processor's own (options.maxLengthBound), not the tokenizer's. */
  readonly #boundSource: string | undefined;

  constructor(imageProcessor: BlipImageProcessor, tokenizer: PreTrainedTokenizer, options: { numQueryTokens?: number | null; dtype?: PixelDType; maxLengthBound?: number } = {}) {
    if (!(imageProcessor instanceof BlipImageProcessor)) throw InvalidArgumentError.of('imageProcessor', imageProcessor, 'a BlipImageProcessor');
    if (!(tokenizer instanceof PreTrainedTokenizer)) throw InvalidArgumentError.of('tokenizer', tokenizer, 'a PreTrainedTokenizer');
    const nq = options.numQueryTokens ?? null;
    if (nq !== null && !isInteger(nq, 1)) throw InvalidArgumentError.of('numQueryTokens', nq, 'an integer >= 1 or null');
    const bound = options.maxLengthBound;
    if (bound !== undefined) integer('maxLengthBound', bound, 1);
    const id = tokenizer.tokenToId(IMAGE_TOKEN);
    if (id === undefined) {
      throw new InvalidArgumentError(`the tokenizer has no ${IMAGE_TOKEN} token; load it with ensureTokens: ['${IMAGE_TOKEN}']`, {
        argument: 'tokenizer', expected: `a tokenizer with ${IMAGE_TOKEN}`,
      });
    }
    this.imageProcessor = imageProcessor;
    this.tokenizer = tokenizer;
    this.numQueryTokens = nq;
    this.imageTokenId = id;
    this.dtype = options.dtype ?? 'float32';
    this.maxLengthBound = bound ?? tokenizer.maxLengthBound;
    this.#boundSource = bound !== undefined ? "the processor's maxLengthBound option" : undefined;
  }

  /**
   * Loads a blip2-node model folder (manifest.json + the checkpoint's processor and tokenizer
   * files) or a plain Hugging Face checkpoint folder: preprocessor_config.json, tokenizer.json
   * (+ tokenizer_config.json, special_tokens_map.json) and processor_config.json (num_query_tokens).
   */
  static async fromPretrained(dir: string): Promise<Blip2Processor> {
    if (typeof dir !== 'string') throw InvalidArgumentError.of('dir', dir, 'a folder path');
    if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new ModelLoadError(`${dir} is not a folder`, { file: dir });
    const manifest = readJsonIfExists(path.join(dir, 'manifest.json')) as ManifestInfo | undefined;
    const processorConfig = readJsonIfExists(path.join(dir, 'processor_config.json')) ?? {};
    const preprocessorConfig = readJsonIfExists(path.join(dir, 'preprocessor_config.json')) ?? {};
    const imageProcessor = BlipImageProcessor.fromPretrained(dir);
    // The tokenizer takes the model's length and vocabulary size from the folder too.
    const tokenizer = PreTrainedTokenizer.fromPretrained(dir, { ensureTokens: [IMAGE_TOKEN] });

    let numQueryTokens: number | null = null;
    const fromConfig = processorConfig.num_query_tokens ?? preprocessorConfig.num_query_tokens;
    if (manifest?.architecture === 'itm') {
      // Retrieval models take the text alone (transformers' would strip the image tokens again).
      numQueryTokens = null;
    } else if (fromConfig !== undefined && fromConfig !== null) {
      if (!isInteger(fromConfig, 1)) {
        const file = path.join(dir, 'processor_config.json');
        throw new ModelLoadError(`${file}: num_query_tokens is ${describeValue(fromConfig)}; expected ${integerRange(1)}`, { file });
      }
      numQueryTokens = fromConfig;
    } else if (manifest && manifest.image_token_index !== null && manifest.image_token_index !== undefined && typeof manifest.num_query_tokens === 'number') {
      // A model exported for image tokens whose checkpoint had no processor_config.json.
      numQueryTokens = manifest.num_query_tokens;
    }
    const imageTokenId = tokenizer.tokenToId(IMAGE_TOKEN)!;
    if (manifest && typeof manifest.image_token_index === 'number' && numQueryTokens !== null && manifest.image_token_index !== imageTokenId) {
      throw new ModelLoadError(
        `${path.join(dir, 'manifest.json')}: image_token_index is ${manifest.image_token_index} but the tokenizer's ${IMAGE_TOKEN} is ${imageTokenId}`,
        { file: path.join(dir, 'manifest.json') },
      );
    }
    const dtype = manifest && ['float32', 'float16', 'bfloat16', 'float64'].includes(String(manifest.dtype)) ? (manifest.dtype as PixelDType) : 'float32';
    return new Blip2Processor(imageProcessor, tokenizer, { numQueryTokens, dtype });
  }

  /** Images and text → model inputs, as `Blip2Processor(images=..., text=..., return_tensors="pt")`. */
  process(options: ProcessOptions & { images: Images; text: Texts }): Promise<Blip2ProcessorOutput>;
  process(options: ProcessOptions & { images: Images; text?: undefined }): Promise<{ pixelValues: Tensor }>;
  process(options: ProcessOptions & { images?: undefined; text: Texts }): Promise<{ inputIds: Tensor; attentionMask: Tensor }>;
  process(options: ProcessOptions): Promise<Partial<Blip2ProcessorOutput>>;
  async process(options: ProcessOptions): Promise<Partial<Blip2ProcessorOutput>> {
    if (options === null || typeof options !== 'object') throw InvalidArgumentError.of('options', options, 'an object { images, text, ... }');
    const signal = requireSignal(options.signal);
    const { images, text } = options;
    if (images === undefined && text === undefined) throw InvalidArgumentError.of('images', images, 'images, text, or both');
    const imageList = images === undefined ? undefined : Array.isArray(images) ? (images as readonly ImageInput[]) : [images as ImageInput];
    if (imageList && imageList.length === 0) throw InvalidArgumentError.of('images', images, 'at least one image');
    const device = options.device ?? 'cpu';
    if (typeof device !== 'string') throw InvalidArgumentError.of('device', device, "a device string such as 'cpu' or 'cuda:0'");

    // Text first: its errors need no decoding.
    let texts: readonly string[] | undefined;
    if (text !== undefined && imageList && imageList.length > TEXT_LIMITS.maxTexts) {
      throw InvalidArgumentError.of('images', images, `at most ${TEXT_LIMITS.maxTexts} images per call with text (one row each)`);
    }
    if (text !== undefined) {
      if (typeof text === 'string') {
        texts = new Array<string>(imageList?.length ?? 1).fill(text);
      } else if (Array.isArray(text)) {
        // The count before the walk: a huge array is rejected at once.
        if (text.length > TEXT_LIMITS.maxTexts) throw InvalidArgumentError.of('text', text, `at most ${TEXT_LIMITS.maxTexts} texts per call`);
        text.forEach((t, index) => {
          if (typeof t !== 'string') {
            throw new InvalidArgumentError(`argument 'text[${index}]' is ${describeValue(t)}; expected a string`, {
              argument: `text[${index}]`, value: describeValue(t), expected: 'a string', index,
            });
          }
        });
        if (text.length === 0) throw InvalidArgumentError.of('text', text, 'a string or a non-empty array of strings');
        if (imageList && text.length > imageList.length) {
          throw new InvalidArgumentError(
            `more texts (${text.length}) than images (${imageList.length}): text ${imageList.length} has no image; pass one text per image`,
            { argument: 'text', value: `${text.length} texts`, expected: `at most ${imageList.length} texts (one per image)`, index: imageList.length },
          );
        }
        if (imageList && text.length < imageList.length) {
          throw new InvalidArgumentError(
            `fewer texts (${text.length}) than images (${imageList.length}): image ${text.length} has no text; pass one text per image, or a single string for all`,
            { argument: 'text', value: `${text.length} texts`, expected: `${imageList.length} texts (one per image)`, index: text.length },
          );
        }
        texts = text;
      } else {
        throw InvalidArgumentError.of('text', text, 'a string or an array of strings');
      }
    }
    let encoding: EncodedRows | undefined;
    if (texts) {
      const prefix = imageList && this.numQueryTokens !== null ? { id: this.imageTokenId, count: this.numQueryTokens } : undefined;
      // Small texts are tokenized here, large ones in the tokenizer's worker thread.
      encoding = await this.tokenizer[encodeForProcessor](texts, {
        addSpecialTokens: options.addSpecialTokens,
        padding: options.padding,
        truncation: options.truncation,
        maxLength: options.maxLength,
        padToMultipleOf: options.padToMultipleOf,
        paddingSide: options.paddingSide,
      }, {
        maxLengthBound: this.#boundSource === undefined ? undefined : this.maxLengthBound, boundSource: this.#boundSource, prefix, signal,
      });
      const lengths = new Set(encoding.lengths);
      if (lengths.size > 1) {
        const prefixLength = prefix?.count ?? 0;
        throw new InvalidArgumentError(
          `the texts tokenize to different lengths (${[...lengths].map((n) => n - prefixLength).join(', ')}); pass padding: true (or 'max_length') to batch them`,
          { argument: 'padding', value: String(options.padding ?? false), expected: "true, 'longest' or 'max_length'" },
        );
      }
    }
    throwIfAborted(signal);

    const out: Partial<Blip2ProcessorOutput> = {};
    try {
      if (imageList) {
        out.pixelValues = await this.imageProcessor.preprocess(imageList, {
          device, dtype: options.dtype ?? this.dtype, signal, autoOrient: options.autoOrient, maxPixels: options.maxPixels,
          maxTotalPixels: options.maxTotalPixels,
        });
      }
      if (encoding) {
        // int32 ids and uint8 mask widen to int64 in the addon (one copy each, no per-item JS work).
        const shape = [encoding.rows, encoding.width];
        out.inputIds = Tensor.from(encoding.ids, shape, { dtype: 'int64', device });
        out.attentionMask = Tensor.from(encoding.mask, shape, { dtype: 'int64', device });
      }
      throwIfAborted(signal);
    } catch (error) {
      out.pixelValues?.dispose();
      out.inputIds?.dispose();
      out.attentionMask?.dispose();
      throw error;
    }
    return out;
  }

  /** transformers' `processor.decode` (the tokenizer's). */
  decode(ids: Tensor, options?: DecodeOptions): Promise<string>;
  decode(ids: TokenIds, options?: DecodeOptions): string;
  decode(ids: TokenIds | Tensor, options?: DecodeOptions): string | Promise<string> {
    return ids instanceof Tensor ? this.tokenizer.decode(ids, options) : this.tokenizer.decode(ids, options);
  }

  /** transformers' `processor.batch_decode` (the tokenizer's). */
  batchDecode(sequences: Tensor, options?: DecodeOptions): Promise<string[]>;
  batchDecode(sequences: readonly TokenIds[], options?: DecodeOptions): string[];
  batchDecode(sequences: readonly TokenIds[] | Tensor, options?: DecodeOptions): string[] | Promise<string[]> {
    return sequences instanceof Tensor ? this.tokenizer.batchDecode(sequences, options) : this.tokenizer.batchDecode(sequences, options);
  }
}
