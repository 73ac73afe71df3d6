// Image inputs → 8-bit pixels with the colours PIL gives, so that BlipImageProcessor sees what
// transformers sees after `Image.open(...).convert("RGB")`.
//
// Decoding runs in sharp (libvips, on the libuv pool: off the JS thread). What we ask of it, and
// why (each checked against Pillow 9.4 by test/fixtures/processor, see its README):
//   - no ICC transform (`ignoreIcc`): PIL never applies embedded profiles;
//   - no EXIF rotation unless `autoOrient` (transformers does not rotate);
//   - CMYK JPEGs are read as raw CMYK (`pipelineColourspace('cmyk')`, no profile) and converted
//     with PIL's own formula (Convert.c cmyk2rgb);
//   - 16-bit greyscale (PIL mode I / I;16) is read as 16-bit and clipped to 0..255, which is what
//     PIL's I → RGB conversion does; 16-bit RGB(A)/LA keep the high byte (libvips and PIL agree);
//   - GIF: libvips gives transparent pixels as (0,0,0,0); PIL keeps the palette colour of the
//     transparent index, which we read from the file and put back;
//   - alpha is dropped by the native step (PIL's convert("RGB") drops it, no compositing);
//   - failOn 'error': like PIL, truncated or corrupt data is an error but libjpeg's warnings
//     ("extraneous bytes before marker") are not.
import * as fs from 'node:fs/promises';
import * as os from 'node:os';

import sharp from 'sharp';

import type { NativeImage } from '../../typings/binding';

import { ImageDecodeError, InvalidArgumentError, describeValue } from '../errors';
import { Semaphore } from '../runtime/semaphore';
import { integer, isInteger } from '../validation';

/** 8-bit interleaved pixels: channels 1 = grey, 2 = grey + alpha, 3 = RGB, 4 = RGBA; rows packed. */
export interface RawImage {
  data: Uint8Array | Uint8ClampedArray;
  width: number;
  height: number;
  channels: 1 | 2 | 3 | 4;
}

/**
 * One image: the bytes of an encoded file (JPEG, PNG, WebP, GIF, TIFF, AVIF, ... whatever sharp
 * decodes), a file path, or raw 8-bit pixels.
 */
export type ImageInput = Uint8Array | ArrayBuffer | string | RawImage;

export interface DecodeOptions {
  /** Apply the EXIF orientation (transformers does not; default false). */
  autoOrient?: boolean;
  /** Reject images with more pixels (width x height); default 100,000,000. */
  maxPixels?: number;
  /** The image's position in the batch, for error messages. */
  index?: number;
}

/** Decoded pixels as the native step takes them (NativeImage), plus what the decoder saw. */
export interface DecodedImage extends NativeImage {
  /** sharp's name of the container ('jpeg', 'png', ...) or 'raw'. */
  format: string;
  /** True when the source was a palette image or CMYK (not plain RGB even before conversion). */
  converted: boolean;
}

/** Images with more pixels than this are rejected from their header unless maxPixels says otherwise. */
export const DEFAULT_MAX_PIXELS = 100_000_000;
/** Pixels of all the images of one call together, unless maxTotalPixels says otherwise (and at least maxPixels). */
export const DEFAULT_MAX_TOTAL_PIXELS = 100_000_000;
/**
 * Images decoded to raw pixels at once in this process, across all calls: each decode holds its
 * full-size pixels plus libvips' working memory, and libvips already spreads one decode over the
 * cores, so more at once would add memory, not speed.
 */
export const MAX_CONCURRENT_DECODES = Math.max(1, Math.min(4, os.availableParallelism()));
const decodeSlots = new Semaphore(MAX_CONCURRENT_DECODES);

export function isRawImage(value: unknown): value is RawImage {
  return (
    typeof value === 'object' && value !== null && !ArrayBuffer.isView(value) && !(value instanceof ArrayBuffer) &&
    'data' in value && 'width' in value && 'height' in value
  );
}

function decodeError(index: number, message: string, cause?: unknown): ImageDecodeError {
  const error = new ImageDecodeError(`image at index ${index}: ${message}`, { index });
  if (cause !== undefined) Object.defineProperty(error, 'cause', { value: cause, enumerable: false, configurable: true, writable: true });
  return error;
}

export function checkMaxPixels(maxPixels: unknown, argument = 'maxPixels', fallback = DEFAULT_MAX_PIXELS): number {
  if (maxPixels === undefined) return fallback;
  return integer(argument, maxPixels, 1);
}

/** An image whose size is known (header read, limits checked) and whose pixels are not decoded yet. */
export interface ProbedImage {
  width: number;
  height: number;
  decode(): Promise<DecodedImage>;
}

/** Raw pixels given by the user: checked now, copied at decode (the caller may reuse or detach its buffer). */
function probeRaw(raw: RawImage, index: number, maxPixels: number): ProbedImage {
  const { data, width, height, channels } = raw;
  const where = `images[${index}]`;
  if (!(data instanceof Uint8Array) && !(data instanceof Uint8ClampedArray)) {
    throw new InvalidArgumentError(`argument '${where}.data' is ${describeValue(data)}; expected a Uint8Array of 8-bit pixels`, {
      argument: `${where}.data`, value: describeValue(data), expected: 'a Uint8Array', index,
    });
  }
  for (const [key, value] of [['width', width], ['height', height]] as const) {
    if (!isInteger(value, 0)) {
      throw new InvalidArgumentError(`argument '${where}.${key}' is ${describeValue(value)}; expected a positive integer`, {
        argument: `${where}.${key}`, value: describeValue(value), expected: 'a positive integer', index,
      });
    }
  }
  if (channels !== 1 && channels !== 2 && channels !== 3 && channels !== 4) {
    throw new InvalidArgumentError(
      `argument '${where}.channels' is ${describeValue(channels)}; expected 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)`,
      { argument: `${where}.channels`, value: describeValue(channels), expected: '1, 2, 3 or 4', index },
    );
  }
  if (width === 0 || height === 0) throw decodeError(index, `the image is ${width}x${height} pixels; it needs a width and a height of at least 1`);
  if (width * height > maxPixels) {
    throw decodeError(index, `the image has ${width * height} pixels (${width}x${height}), above the limit of ${maxPixels} pixels (option maxPixels)`);
  }
  if (data.length !== width * height * channels) {
    throw decodeError(index, `data holds ${data.length} bytes but width x height x channels = ${width}x${height}x${channels} = ${width * height * channels}`);
  }
  return {
    width, height,
    decode: async () => {
      const copy = new Uint8Array(data.length);
      copy.set(data);
      return { data: copy, width, height, channels, format: 'raw', converted: false };
    },
  };
}

/**
 * The colour PIL shows for the transparent palette index of a GIF's first frame (PIL's first
 * frame is mode P, and convert("RGB") looks the index up in the palette), or undefined.
 */
export function gifTransparentColour(bytes: Uint8Array): [number, number, number] | undefined {
  if (bytes.length < 13 || String.fromCharCode(bytes[0], bytes[1], bytes[2]) !== 'GIF') return undefined;
  let p = 6;
  const packed = bytes[p + 4];
  p += 7;
  let globalTable: Uint8Array | undefined;
  if (packed & 0x80) {
    const size = 3 * (1 << ((packed & 7) + 1));
    if (p + size > bytes.length) return undefined;
    globalTable = bytes.subarray(p, p + size);
    p += size;
  }
  let transparent: number | undefined;
  while (p < bytes.length) {
    const block = bytes[p];
    if (block === 0x21) {
      // extension: label, then sub-blocks
      const label = bytes[p + 1];
      p += 2;
      if (label === 0xf9 && bytes[p] === 4 && p + 4 < bytes.length) {
        transparent = bytes[p + 1] & 1 ? bytes[p + 4] : undefined;
      }
      while (p < bytes.length && bytes[p] !== 0) p += bytes[p] + 1;
      p += 1;
    } else if (block === 0x2c) {
      // image descriptor: the first frame
      if (p + 10 > bytes.length) return undefined;
      const localPacked = bytes[p + 9];
      let table = globalTable;
      if (localPacked & 0x80) {
        const size = 3 * (1 << ((localPacked & 7) + 1));
        if (p + 10 + size > bytes.length) return undefined;
        table = bytes.subarray(p + 10, p + 10 + size);
      }
      if (transparent === undefined || !table || 3 * transparent + 2 >= table.length) return undefined;
      return [table[3 * transparent], table[3 * transparent + 1], table[3 * transparent + 2]];
    } else {
      return undefined;
    }
  }
  return undefined;
}

async function probeEncoded(bytes: Uint8Array, index: number, options: { autoOrient: boolean; maxPixels: number }): Promise<ProbedImage> {
  if (bytes.length === 0) throw decodeError(index, 'the buffer is empty (0 bytes)');
  const settings = {
    failOn: 'error' as const,
    limitInputPixels: options.maxPixels,
    ignoreIcc: true,
    autoOrient: options.autoOrient,
    pages: 1,
    page: 0,
  };
  // One sharp instance: the header is parsed once, for the checks and for the decode.
  const image = sharp(bytes, settings);
  let metadata: sharp.Metadata;
  try {
    metadata = await image.metadata();
  } catch (error) {
    if (/pixel limit/i.test((error as Error)?.message ?? '')) {
      // sharp refused the header against limitInputPixels: read it again, unlimited, to say how big it is.
      const size = await sharp(bytes, { ...settings, limitInputPixels: false }).metadata().catch(() => undefined);
      if (size?.width && size.height) throw tooManyPixels(index, size.format, size.width, size.height, options.maxPixels);
    }
    throw decodeError(index, describeSharpError(error), error);
  }
  const { width, height, format } = metadata;
  if (!width || !height) throw decodeError(index, `the ${format ?? 'image'} is ${width ?? 0}x${height ?? 0} pixels; it needs a width and a height of at least 1`);
  if (width * height > options.maxPixels) throw tooManyPixels(index, format, width, height, options.maxPixels);
  return { width, height, decode: () => decodePixels(image, bytes, metadata, index) };
}

async function decodePixels(image: sharp.Sharp, bytes: Uint8Array, metadata: sharp.Metadata, index: number): Promise<DecodedImage> {
  const { format, space } = metadata;
  try {
    // Nothing here loops over pixels on the JS thread: libvips does the casts, the native step the rest.
    const cmyk = space === 'cmyk';
    if (cmyk) {
      // Raw C, M, Y, K as decoded (Adobe inversion undone by the loader, as PIL does), no profile.
      image.pipelineColourspace('cmyk').toColourspace('cmyk');
    } else if (space === 'grey16' && !metadata.hasAlpha) {
      // PIL: mode I (PNG) / I;16 (TIFF), whose convert("RGB") clips each value to 0..255, which is
      // what libvips' ushort → uchar cast does.
      image.toColourspace('grey16');
    } else if (space === 'b-w' && !metadata.hasAlpha) {
      image.toColourspace('b-w');
    }
    const { data, info } = await image.raw({ depth: 'uchar' }).toBuffer({ resolveWithObject: true });
    const channels = info.channels as number;
    if (channels < 1 || channels > 4 || (cmyk && channels !== 4)) {
      throw decodeError(index, `the decoder produced ${channels} channels${cmyk ? ' of CMYK' : ''}; expected ${cmyk ? '4' : '1 to 4'}`);
    }
    const decoded: DecodedImage = {
      data: new Uint8Array(data.buffer, data.byteOffset, data.length), width: info.width, height: info.height,
      channels: channels as 1 | 2 | 3 | 4, format: format ?? 'unknown',
      converted: cmyk || Boolean(metadata.isPalette) || space === 'grey16',
    };
    if (cmyk) decoded.cmyk = true;
    if (format === 'gif' && channels === 4) {
      const colour = gifTransparentColour(bytes);
      if (colour) decoded.transparentColour = colour;
    }
    return decoded;
  } catch (error) {
    if (error instanceof ImageDecodeError) throw error;
    throw decodeError(index, describeSharpError(error), error);
  }
}

function tooManyPixels(index: number, format: string | undefined, width: number, height: number, maxPixels: number): ImageDecodeError {
  return decodeError(index, `the ${format ?? ''} image has ${width * height} pixels (${width}x${height}), above the limit of ${maxPixels} pixels (option maxPixels)`);
}

function describeSharpError(error: unknown): string {
  const message = error instanceof Error ? error.message : String(error);
  if (/unsupported image format/i.test(message)) return 'not a supported image format (unrecognised or corrupt data)';
  if (/pixel limit/i.test(message)) return `above the pixel limit: ${message}`;
  return `cannot be decoded: ${message.trim()}`;
}

/**
 * Reads one image input's size and checks it against maxPixels, without decoding the pixels.
 * Rejects with ImageDecodeError (bad data) or InvalidArgumentError (a value of the wrong kind),
 * both naming `options.index`.
 */
export async function probeImage(input: ImageInput, options: DecodeOptions = {}): Promise<ProbedImage> {
  const index = options.index ?? 0;
  const maxPixels = checkMaxPixels(options.maxPixels);
  const autoOrient = options.autoOrient ?? false;
  if (typeof autoOrient !== 'boolean') throw InvalidArgumentError.of('autoOrient', autoOrient, 'a boolean');
  if (typeof input === 'string') {
    let bytes: Buffer;
    try {
      bytes = await fs.readFile(input);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      throw decodeError(index, `cannot read file ${JSON.stringify(input)}${code ? ` (${code})` : ''}: ${(error as Error).message}`, error);
    }
    return probeEncoded(bytes, index, { autoOrient, maxPixels });
  }
  if (input instanceof ArrayBuffer) return probeEncoded(new Uint8Array(input), index, { autoOrient, maxPixels });
  if (input instanceof Uint8Array || input instanceof Uint8ClampedArray) {
    return probeEncoded(new Uint8Array(input.buffer, input.byteOffset, input.byteLength), index, { autoOrient, maxPixels });
  }
  if (isRawImage(input)) {
    return probeRaw(input, index, maxPixels); // raw pixels carry no orientation
  }
  throw new InvalidArgumentError(
    `argument 'images[${index}]' is ${describeValue(input)}; expected encoded image bytes (Buffer/Uint8Array), a file path or raw pixels { data, width, height, channels }`,
    { argument: `images[${index}]`, value: describeValue(input), expected: 'a Buffer, Uint8Array, file path or { data, width, height, channels }', index },
  );
}

/** Decodes a probed image in one of the process's MAX_CONCURRENT_DECODES slots; undefined when `skip()` says so once the slot is free. */
export function decodeProbed(image: ProbedImage, signal?: AbortSignal): Promise<DecodedImage>;
export function decodeProbed(image: ProbedImage, signal: AbortSignal | undefined, skip: () => boolean): Promise<DecodedImage | undefined>;
export function decodeProbed(image: ProbedImage, signal?: AbortSignal, skip?: () => boolean): Promise<DecodedImage | undefined> {
  return decodeSlots.run(async () => (skip?.() ? undefined : image.decode()), signal);
}

/**
 * Decodes one image input. Encoded bytes and files go through sharp off the JS thread; raw pixels
 * are checked and copied. Rejects with ImageDecodeError (bad data) or InvalidArgumentError (a
 * value of the wrong kind), both naming `options.index`.
 */
export async function decodeImage(input: ImageInput, options: DecodeOptions = {}): Promise<DecodedImage> {
  return decodeProbed(await probeImage(input, options));
}
