// Every error a user can cause is one of these, with a stable `code`. Native code creates them
// through the factory registered in native/binding.ts, so they carry the right class from birth.

/** What an error names: the argument, its value, what was expected, a file or a batch index. */
export interface ErrorDetails {
  argument?: string;
  value?: string;
  expected?: string;
  file?: string;
  index?: number;
}

/** The base class of every error of this package; `code` is stable (ERR_BLIP2_...), `name` is the class name. */
export class Blip2Error extends Error {
  readonly code: string;
  constructor(message: string, code: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** A value outside what the API accepts; `argument`, `value` and `expected` say which and why. */
export class InvalidArgumentError extends Blip2Error {
  readonly argument?: string;
  readonly value?: string;
  readonly expected?: string;
  /** For batched inputs: the position of the offending item (image or text). */
  readonly index?: number;
  constructor(message: string, details: ErrorDetails = {}, code = 'ERR_BLIP2_INVALID_ARGUMENT') {
    super(message, code);
    this.argument = details.argument;
    this.value = details.value;
    this.expected = details.expected;
    if (details.index !== undefined) this.index = details.index;
  }

  /** "argument 'maxNewTokens' is 0; expected an integer >= 1" */
  static of(argument: string, value: unknown, expected: string): InvalidArgumentError {
    const shown = describeValue(value);
    return new InvalidArgumentError(`argument '${argument}' is ${shown}; expected ${expected}`, { argument, value: shown, expected });
  }
}

/** Tensor shapes that do not fit together (element counts, batch sizes, ranks). */
export class ShapeError extends InvalidArgumentError {
  constructor(message: string, details: ErrorDetails = {}) {
    super(message, details, 'ERR_BLIP2_SHAPE');
  }
}

/** A tensor or typed array of the wrong element type. */
export class DTypeError extends InvalidArgumentError {
  constructor(message: string, details: ErrorDetails = {}) {
    super(message, details, 'ERR_BLIP2_DTYPE');
  }
}

/** Use of a tensor, module or model after dispose(). */
export class DisposedError extends Blip2Error {
  constructor(message: string) {
    super(message, 'ERR_BLIP2_DISPOSED');
  }
}

/** An unknown or unavailable device ('cuda' without CUDA, 'cuda:3' on a one-GPU machine). */
export class DeviceError extends InvalidArgumentError {
  constructor(message: string, details: ErrorDetails = {}) {
    super(message, details, 'ERR_BLIP2_DEVICE');
  }
}

/** A model folder or module file that is missing, damaged or of an unsupported format. */
export class ModelLoadError extends Blip2Error {
  readonly file?: string;
  constructor(message: string, details: ErrorDetails = {}) {
    super(message, 'ERR_BLIP2_MODEL_LOAD');
    this.file = details.file;
  }
}

/** libtorch failed while running (the message is libtorch's, without its C++ backtrace). */
export class TorchError extends Blip2Error {
  constructor(message: string) {
    super(message, 'ERR_BLIP2_TORCH');
  }
}

/** An allocation failed on the device or the host. */
export class OutOfMemoryError extends Blip2Error {
  constructor(message: string) {
    super(message, 'ERR_BLIP2_OUT_OF_MEMORY');
  }
}

/** The operation was cancelled through its AbortSignal (same name and code as Node's own AbortError). */
export class AbortError extends Blip2Error {
  constructor(message = 'The operation was aborted', options?: { cause?: unknown }) {
    super(message, 'ABORT_ERR', options);
    this.name = 'AbortError';
  }
}

/** Back-pressure: the model's queue holds maxQueue calls already; retry later or raise maxQueue. */
export class QueueFullError extends Blip2Error {
  readonly argument?: string;
  readonly value?: string;
  constructor(message: string, details: ErrorDetails = {}) {
    super(message, 'ERR_BLIP2_QUEUE_FULL');
    this.argument = details.argument;
    this.value = details.value;
  }
}

/** An image that cannot be decoded or is outside the accepted limits; `index` is its position in the batch. */
export class ImageDecodeError extends Blip2Error {
  readonly index?: number;
  constructor(message: string, details: ErrorDetails = {}) {
    super(message, 'ERR_BLIP2_IMAGE_DECODE');
    this.index = details.index;
  }
}

/** A bug of ours: please report it. */
export class InternalError extends Blip2Error {
  constructor(message: string) {
    super(message, 'ERR_BLIP2_INTERNAL');
  }
}

/** A short description of a value for error messages: `"text"`, `3`, `an array of length 2`, `a Float32Array of 16 bytes`. */
export function describeValue(value: unknown): string {
  if (value === undefined) return 'undefined';
  if (value === null) return 'null';
  if (typeof value === 'string') return JSON.stringify(value.length > 80 ? `${value.slice(0, 77)}...` : value);
  if (typeof value === 'number' || typeof value === 'boolean' || typeof value === 'bigint') return String(value);
  if (Array.isArray(value)) return `an array of length ${value.length}`;
  if (ArrayBuffer.isView(value)) return `a ${value.constructor.name} of ${value.byteLength} bytes`;
  if (typeof value === 'function') return 'a function';
  return `an object (${(value as object).constructor?.name ?? 'Object'})`;
}

/** Builds the error class for a native error code. */
export function errorFromNative(code: string, message: string, details: Record<string, string>): Error {
  const parsed: ErrorDetails = { ...details, index: details.index === undefined ? undefined : Number(details.index) };
  switch (code) {
    case 'ERR_BLIP2_INVALID_ARGUMENT': return new InvalidArgumentError(message, parsed);
    case 'ERR_BLIP2_SHAPE': return new ShapeError(message, parsed);
    case 'ERR_BLIP2_DTYPE': return new DTypeError(message, parsed);
    case 'ERR_BLIP2_DISPOSED': return new DisposedError(message);
    case 'ERR_BLIP2_DEVICE': return new DeviceError(message, parsed);
    case 'ERR_BLIP2_MODEL_LOAD': return new ModelLoadError(message, parsed);
    case 'ERR_BLIP2_TORCH': return new TorchError(message);
    case 'ERR_BLIP2_OUT_OF_MEMORY': return new OutOfMemoryError(message);
    case 'ABORT_ERR': return new AbortError(message);
    case 'ERR_BLIP2_QUEUE_FULL': return new QueueFullError(message, parsed);
    case 'ERR_BLIP2_IMAGE_DECODE': return new ImageDecodeError(message, parsed);
    default: return new InternalError(`${message} (${code})`);
  }
}
