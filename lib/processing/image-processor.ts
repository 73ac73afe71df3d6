// BlipImageProcessor (transformers.models.blip.image_processing_blip): convert to RGB, resize with
// PIL, rescale, normalize, channels first. The resize is PIL-exact (native/image/pil_resample.cc);
// rescale and normalize are folded into a 3 x 256 table computed here with transformers' own float
// arithmetic, which the native step applies on the target device.
import * as fs from 'node:fs';
import * as path from 'node:path';

import type { NativeDType } from '../../typings/binding';
import { AbortError, ImageDecodeError, InvalidArgumentError, ModelLoadError } from '../errors';
import { requireSignal, withAbort } from '../runtime/abort';
import { binding } from '../native/binding';
import { Tensor } from '../tensor/tensor';
import { isInteger } from '../validation';
import {
  DEFAULT_MAX_PIXELS, DEFAULT_MAX_TOTAL_PIXELS, type DecodedImage, type ImageInput, type ProbedImage, checkMaxPixels, decodeProbed, probeImage,
} from './image-decode';

/** Images of one call: what the native step takes. */
const MAX_IMAGES = 65_536;

/** OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: BlipImageProcessor's defaults. */
export const OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073] as const;
export const OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711] as const;

/** PIL's resampling filters by their preprocessor_config.json number. */
export const PIL_RESAMPLE = { nearest: 0, lanczos: 1, bilinear: 2, bicubic: 3, box: 4, hamming: 5 } as const;

/** The dtypes pixel values can be made in. */
export type PixelDType = 'float32' | 'float16' | 'bfloat16' | 'float64';

/** The fields of preprocessor_config.json that BlipImageProcessor reads (snake_case, as saved by transformers). */
export interface BlipImageProcessorConfig {
  do_resize?: boolean;
  /** {height, width}; legacy forms: an int (square) or [height, width]. */
  size?: number | [number, number] | { height: number; width: number };
  resample?: number;
  do_rescale?: boolean;
  rescale_factor?: number;
  do_normalize?: boolean;
  image_mean?: number | number[];
  image_std?: number | number[];
  do_convert_rgb?: boolean;
  [key: string]: unknown;
}

/** Options of BlipImageProcessor.preprocess(). */
export interface PreprocessOptions {
  /** 'cpu' (default) or 'cuda[:N]': where the pixel values are made. */
  device?: string;
  /** Default float32 (the values are computed in float32, as transformers does, then cast). */
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

function configError(argument: string, value: unknown, expected: string): InvalidArgumentError {
  return InvalidArgumentError.of(`preprocessor_config.${argument}`, value, expected);
}

function bool(config: BlipImageProcessorConfig, key: keyof BlipImageProcessorConfig, fallback: boolean): boolean {
  const v = config[key];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== 'boolean') throw configError(String(key), v, 'a boolean');
  return v;
}

function channelValues(config: BlipImageProcessorConfig, key: 'image_mean' | 'image_std', fallback: readonly number[]): number[] {
  const v = config[key];
  if (v === undefined || v === null) return [...fallback];
  // transformers.image_transforms.normalize: a scalar applies to every channel, a list needs one per channel.
  if (typeof v === 'number' && Number.isFinite(v)) return [v, v, v];
  if (Array.isArray(v) && v.length === 3 && v.every((x) => typeof x === 'number' && Number.isFinite(x))) return [...v];
  throw configError(key, v, 'a number or a list of 3 numbers (one per RGB channel)');
}

/** transformers' get_size_dict(size, default_to_square=True) → {height, width}, which BLIP's resize requires. */
function parseSize(size: BlipImageProcessorConfig['size']): { height: number; width: number } {
  const positive = (x: unknown): x is number => isInteger(x, 1);
  if (size === undefined || size === null) return { height: 384, width: 384 };
  if (positive(size)) return { height: size, width: size };
  if (Array.isArray(size) && size.length === 2 && positive(size[0]) && positive(size[1])) return { height: size[0], width: size[1] };
  if (typeof size === 'object' && !Array.isArray(size)) {
    const s = size as Record<string, unknown>;
    if (positive(s.height) && positive(s.width)) return { height: s.height, width: s.width };
  }
  throw configError('size', size, '{ "height": H, "width": W } (BlipImageProcessor resizes to an exact size; shortest_edge forms are not used by BLIP)');
}

/**
 * The float32 value of every 8-bit level after transformers' rescale and normalize:
 *   rescale:   float32(float64(v) * rescale_factor)            (image_transforms.rescale)
 *   normalize: float32(float32(x - float32(mean)) / float32(std)) (image_transforms.normalize, float32 numpy)
 * JavaScript computes in float64; rounding each +,-,*,/ result with Math.fround gives the float32
 * result bit for bit (double rounding is exact for these operations).
 */
export function pixelLut(options: { doRescale: boolean; rescaleFactor: number; doNormalize: boolean; mean: readonly number[]; std: readonly number[] }): Float32Array {
  const lut = new Float32Array(3 * 256);
  for (let c = 0; c < 3; c++) {
    const mean = Math.fround(options.mean[c]);
    const std = Math.fround(options.std[c]);
    for (let v = 0; v < 256; v++) {
      let x = options.doRescale ? Math.fround(v * options.rescaleFactor) : v;
      if (options.doNormalize) x = Math.fround(Math.fround(x - mean) / std);
      lut[c * 256 + v] = x;
    }
  }
  return lut;
}

/** transformers' BlipImageProcessor: resize (PIL's filters), rescale, normalize, bit for bit as PIL and transformers compute them. */
export class BlipImageProcessor {
  readonly doResize: boolean;
  readonly size: { height: number; width: number };
  /** PIL resample number (3 = bicubic). */
  readonly resample: number;
  readonly doRescale: boolean;
  readonly rescaleFactor: number;
  readonly doNormalize: boolean;
  readonly imageMean: readonly number[];
  readonly imageStd: readonly number[];
  readonly doConvertRgb: boolean;
  /** The per-level values the native step applies (3 x 256). */
  readonly lut: Float32Array;

  /** From the fields of preprocessor_config.json; missing fields take transformers' defaults. */
  constructor(config: BlipImageProcessorConfig = {}) {
    if (config === null || typeof config !== 'object' || Array.isArray(config)) throw InvalidArgumentError.of('config', config, 'an object');
    this.doResize = bool(config, 'do_resize', true);
    this.size = parseSize(config.size);
    const resample = config.resample ?? PIL_RESAMPLE.bicubic;
    if (!isInteger(resample, 0, 5)) {
      throw configError('resample', resample, 'a PIL resample number from 0 to 5 (3 = bicubic)');
    }
    this.resample = resample;
    this.doRescale = bool(config, 'do_rescale', true);
    const factor = config.rescale_factor ?? 1 / 255;
    if (typeof factor !== 'number' || !Number.isFinite(factor)) throw configError('rescale_factor', factor, 'a number');
    this.rescaleFactor = factor;
    this.doNormalize = bool(config, 'do_normalize', true);
    this.imageMean = channelValues(config, 'image_mean', OPENAI_CLIP_MEAN);
    this.imageStd = channelValues(config, 'image_std', OPENAI_CLIP_STD);
    this.doConvertRgb = bool(config, 'do_convert_rgb', true);
    this.lut = pixelLut({ doRescale: this.doRescale, rescaleFactor: this.rescaleFactor, doNormalize: this.doNormalize, mean: this.imageMean, std: this.imageStd });
  }

  /**
   * Reads `preprocessor_config.json` from a checkpoint or model folder, or, as transformers 5
   * saves processors, the `image_processor` entry of `processor_config.json`.
   */
  static fromPretrained(dir: string): BlipImageProcessor {
    let file = path.join(dir, 'preprocessor_config.json');
    let nested = false;
    if (!fs.existsSync(file)) {
      file = path.join(dir, 'processor_config.json');
      nested = true;
      if (!fs.existsSync(file)) throw new ModelLoadError(`missing preprocessor_config.json (or processor_config.json with image_processor) in ${dir}`, { file: path.join(dir, 'preprocessor_config.json') });
    }
    let config: unknown;
    try {
      config = JSON.parse(fs.readFileSync(file, 'utf8'));
    } catch (error) {
      throw new ModelLoadError(`${file} is not valid JSON: ${(error as Error).message}`, { file });
    }
    if (nested) {
      config = (config as { image_processor?: unknown } | null)?.image_processor;
      if (config === null || typeof config !== 'object') {
        throw new ModelLoadError(`missing preprocessor_config.json in ${dir}, and ${file} has no image_processor entry`, { file });
      }
    }
    try {
      return new BlipImageProcessor(config as BlipImageProcessorConfig);
    } catch (error) {
      throw new ModelLoadError(`${file}: ${(error as Error).message}`, { file });
    }
  }

  /**
   * Images → pixel values [B, 3, size.height, size.width] on `device`. Decoding runs in sharp,
   * resizing on the addon's CPU pool, rescale/normalize/layout/cast in one step on the device.
   * Rejects with ImageDecodeError / InvalidArgumentError naming the image's index.
   *
   * Memory of one call: every image's header is read first (encoded bytes, or the file read into
   * memory) and the call is rejected when the images have more than maxTotalPixels pixels
   * together; then the decoded pixels, at most maxTotalPixels x 4 bytes (RGBA; 400 MB at the
   * default), are held until the native step has resized them into the uint8 batch
   * (B x H x W x 3) and made the output (B x 3 x H x W x 4 bytes for float32: 1.8 MB an image at
   * 384x384). Across calls at most MAX_CONCURRENT_DECODES images are being decoded at once, each
   * with libvips' working memory besides its pixels.
   */
  async preprocess(images: ImageInput | readonly ImageInput[], options: PreprocessOptions = {}): Promise<Tensor> {
    if (options === null || typeof options !== 'object') throw InvalidArgumentError.of('options', options, 'an object');
    const signal = requireSignal(options.signal);
    const list = Array.isArray(images) ? (images as readonly ImageInput[]) : [images as ImageInput];
    if (list.length === 0) throw InvalidArgumentError.of('images', images, 'at least one image');
    if (list.length > MAX_IMAGES) throw InvalidArgumentError.of('images', images, `at most ${MAX_IMAGES} images per call`);
    const dtype = options.dtype ?? 'float32';
    if (!['float32', 'float16', 'bfloat16', 'float64'].includes(dtype)) {
      throw InvalidArgumentError.of('dtype', dtype, "'float32', 'float16', 'bfloat16' or 'float64'");
    }
    if (options.device !== undefined && typeof options.device !== 'string') {
      throw InvalidArgumentError.of('device', options.device, "a device string such as 'cpu' or 'cuda:0'");
    }
    const maxPixels = checkMaxPixels(options.maxPixels);
    const maxTotalPixels = checkMaxPixels(options.maxTotalPixels, 'maxTotalPixels', Math.max(DEFAULT_MAX_TOTAL_PIXELS, maxPixels));
    throwIfAborted(signal);
    const decoded = await decodeAll(list, { autoOrient: options.autoOrient, maxPixels, maxTotalPixels, signal });
    throwIfAborted(signal);
    if (!this.doConvertRgb) {
      decoded.forEach((image, index) => {
        if (image.channels !== 3 || image.converted || image.cmyk) {
          throw new InvalidArgumentError(
            `image at index ${index} is not plain RGB (${image.channels} channels${image.converted ? ', palette or CMYK' : ''}) and the processor has do_convert_rgb=false; transformers cannot batch it either`,
            { argument: `images[${index}]`, value: `${image.channels} channels`, expected: 'an RGB image, or do_convert_rgb=true', index },
          );
        }
      });
    }
    const resize = this.doResize ? { width: this.size.width, height: this.size.height, filter: this.resample } : null;
    const nativeImages = decoded.map(({ data, width, height, channels, cmyk, transparentColour }) => ({ data, width, height, channels, cmyk, transparentColour }));
    const native = await withAbort(
      signal,
      (token) => binding.preprocessImages(nativeImages, { resize, lut: this.lut, dtype: dtype as NativeDType, device: options.device, maxPixels }, token),
      (late) => late.dispose(),
    );
    return Tensor.fromNative(native);
  }
}

/**
 * Reads every image's header, checks the call's pixel budget, then decodes (at most
 * MAX_CONCURRENT_DECODES at once in the process). On failure reports the lowest failing index of
 * the first phase that failed; after one failure, decodes not yet started are skipped.
 */
export async function decodeAll(
  images: readonly ImageInput[],
  options: { autoOrient?: boolean; maxPixels?: number; maxTotalPixels?: number; signal?: AbortSignal },
): Promise<DecodedImage[]> {
  const { signal } = options;
  const maxTotalPixels = checkMaxPixels(options.maxTotalPixels, 'maxTotalPixels', Math.max(DEFAULT_MAX_TOTAL_PIXELS, options.maxPixels ?? DEFAULT_MAX_PIXELS));
  const probed = firstFailure(await Promise.allSettled(images.map((image, index) => probeImage(image, { autoOrient: options.autoOrient, maxPixels: options.maxPixels, index }))));
  let total = 0;
  probed.forEach((image, index) => {
    total += image.width * image.height;
    if (total > maxTotalPixels) {
      throw new ImageDecodeError(
        `image at index ${index}: images 0 to ${index} have ${total} pixels together, above the limit of ${maxTotalPixels} pixels per call (option maxTotalPixels)`,
        { index },
      );
    }
  });
  throwIfAborted(signal);
  // After a failure the call is lost: decodes still waiting for a slot are skipped.
  let failed = false;
  const decodeOne = (image: ProbedImage): Promise<DecodedImage | undefined> =>
    decodeProbed(image, signal, () => failed).catch((error: unknown) => {
      failed = true;
      throw error;
    });
  const decoded = firstFailure(await Promise.allSettled(probed.map(decodeOne)));
  throwIfAborted(signal);
  return decoded as DecodedImage[];
}

/** The values, or the error of the lowest failing index (AbortError as it is, anything untyped as an ImageDecodeError). */
function firstFailure<T>(settled: PromiseSettledResult<T>[]): T[] {
  const values: T[] = [];
  for (const result of settled) {
    if (result.status === 'rejected') {
      const error = result.reason as unknown;
      if (error instanceof ImageDecodeError || error instanceof InvalidArgumentError || error instanceof AbortError) throw error;
      throw new ImageDecodeError(`image decoding failed: ${error instanceof Error ? error.message : String(error)}`, {});
    }
    values.push(result.value);
  }
  return values;
}

export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw signal.reason instanceof AbortError ? signal.reason : new AbortError('The operation was aborted', { cause: signal.reason });
}
