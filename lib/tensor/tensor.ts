import type { NativeTensor } from '../../typings/binding';
import { DisposedError, InvalidArgumentError } from '../errors';
import { binding } from '../native/binding';
import {
  type DType, type IntegerDType, type TensorTypedArray, type TypedArrayOf, INTEGER_RANGES, fitsInteger, isIntegerDType, requireDType, typedArrayFromList,
  valueError,
} from './dtype';

/** Options of Tensor.from(). */
export interface TensorOptions {
  /** Element type; defaults to the data's own (Float32Array → float32, BigInt64Array → int64, number[] → float32...). */
  dtype?: DType;
  /** 'cpu' (default), 'cuda' or 'cuda:N'. */
  device?: string;
}

/** What Tensor.from() takes: a typed array, or a (nested) array of numbers, bigints or booleans. */
export type TensorInput = ArrayBufferView | readonly unknown[];

/**
 * A handle to a libtorch tensor on a device. Creating one copies the data once; reading it back
 * (toArray) copies once. dispose() frees the memory at once; a handle you forget is freed when it
 * is garbage-collected.
 */
export class Tensor<D extends DType = DType> {
  readonly #native: NativeTensor;

  /** @internal use Tensor.from() */
  constructor(native: NativeTensor) {
    this.#native = native;
  }

  /**
   * Makes a tensor from a typed array or a (nested) JS array. `shape` defaults to the nesting of
   * `data` (or [length] for flat data). Uint16Array data carries float16/bfloat16 bits and needs
   * `dtype`. JS arrays must hold values of `dtype` exactly (DTypeError naming the item otherwise);
   * typed arrays of another element type are cast as libtorch casts (fractions drop toward zero),
   * but values an integer dtype cannot hold (out of range, NaN, infinities) are a DTypeError.
   * A typed array over a SharedArrayBuffer is copied out of it first.
   */
  static from<D extends DType = DType>(data: TensorInput, shape?: readonly number[], options: TensorOptions = {}): Tensor<D> {
    if (options === null || typeof options !== 'object') throw InvalidArgumentError.of('options', options, 'an object');
    const dtype = options.dtype === undefined ? undefined : requireDType(options.dtype, 'options.dtype');
    if (options.device !== undefined && typeof options.device !== 'string') {
      throw InvalidArgumentError.of('options.device', options.device, "a device string such as 'cpu' or 'cuda:0'");
    }
    if (shape !== undefined && !Array.isArray(shape)) throw InvalidArgumentError.of('shape', shape, 'an array of non-negative integers');
    if (Array.isArray(data)) {
      const { flat, inferred } = flatten(data);
      const converted = typedArrayFromList(flat, dtype, 'data', inferred.length > 1 ? (i) => nestedPosition(i, inferred) : undefined);
      return new Tensor<D>(binding.NativeTensor.fromData(converted.data, [...(shape ?? inferred)], converted.dtype, options.device));
    }
    if (!ArrayBuffer.isView(data) || data instanceof DataView) {
      throw InvalidArgumentError.of('data', data, 'a TypedArray, a Buffer or a (nested) array of numbers');
    }
    let typed = data as unknown as TensorTypedArray;
    // The addon reads the bytes through an ArrayBuffer, which a SharedArrayBuffer is not; and
    // another thread may write shared memory while we read it, so take a private copy first.
    if (typeof SharedArrayBuffer === 'function' && typed.buffer instanceof SharedArrayBuffer) typed = unshared(typed);
    if (dtype !== undefined && isIntegerDType(dtype)) checkIntegerCast(typed, dtype);
    return new Tensor<D>(binding.NativeTensor.fromData(typed, [...(shape ?? [typed.length])], dtype, options.device));
  }

  /** @internal wraps a handle made by native code */
  static fromNative<D extends DType = DType>(native: NativeTensor): Tensor<D> {
    return new Tensor<D>(native);
  }

  /** The size of each dimension ([] for a scalar). */
  get shape(): number[] {
    return this.#native.shape;
  }
  /** The element type. */
  get dtype(): D {
    return this.#native.dtype as D;
  }
  /** Where the data lives: 'cpu' or 'cuda:N'. */
  get device(): string {
    return this.#native.device;
  }
  /** Bytes of tensor data (not counting the handle). */
  get nbytes(): number {
    return this.#native.nbytes;
  }
  /** True once dispose() has run. */
  get disposed(): boolean {
    return this.#native.disposed;
  }
  /** The number of elements (the product of the shape). */
  get numel(): number {
    return this.#native.shape.reduce((a, b) => a * b, 1);
  }

  /** Copies the data into a new typed array (float16/bfloat16 as raw Uint16 bits, bool as 0/1 bytes). */
  toArray(): Promise<TypedArrayOf[D]> {
    return this.#native.toArray() as Promise<TypedArrayOf[D]>;
  }

  /**
   * The values as a flat JS array, like PyTorch's tolist() but flat (shape gives the layout):
   * numbers, or bigints for int64; float16/bfloat16 decoded to their values, bool as 0/1.
   */
  async toList(): Promise<D extends 'int64' ? bigint[] : number[]> {
    const data = (await this.#native.toArray()) as ArrayLike<number | bigint>;
    const dtype = this.#native.dtype;
    type Out = D extends 'int64' ? bigint[] : number[];
    if (dtype === 'float16') return Array.from(data as Uint16Array, halfToNumber) as Out;
    if (dtype === 'bfloat16') return Array.from(data as Uint16Array, bfloat16ToNumber) as Out;
    return Array.from(data) as Out;
  }

  /** Copies to another device and/or dtype; the same device and dtype give a new handle to the same memory. */
  async to(target: string | { device?: string; dtype?: DType }): Promise<Tensor> {
    const spec = typeof target === 'string' ? { device: target } : target;
    if (spec === null || typeof spec !== 'object') throw InvalidArgumentError.of('target', target, "a device string or { device, dtype }");
    const dtype = spec.dtype === undefined ? undefined : requireDType(spec.dtype, 'dtype');
    return new Tensor(await this.#native.to(spec.device, dtype));
  }

  /**
   * A view of `length` entries of dimension `dim` from `start` (as torch.narrow): no copy; it keeps
   * this tensor's memory alive.
   */
  async narrow(dim: number, start: number, length: number): Promise<Tensor<D>> {
    return new Tensor<D>(await this.#native.narrow(dim, start, length));
  }

  /** A view of entry `index` of dimension `dim`, which it drops (as torch.select, `t[:, index]` for dim 1): no copy. */
  async select(dim: number, index: number): Promise<Tensor<D>> {
    return new Tensor<D>(await this.#native.select(dim, index));
  }

  /** Frees the tensor's memory now. Calling it again does nothing; any other use afterwards throws DisposedError. */
  dispose(): void {
    this.#native.dispose();
  }

  /** dispose(), for `using` declarations. */
  [Symbol.dispose](): void {
    this.dispose();
  }

  /** `Tensor(shape=[2, 3], dtype=float32, device=cpu)`, or `Tensor(disposed)`. */
  toString(): string {
    return this.disposed ? 'Tensor(disposed)' : `Tensor(shape=[${this.shape.join(', ')}], dtype=${this.dtype}, device=${this.device})`;
  }

  /** @internal the native handle, for passing to native calls */
  static native(tensor: unknown, argument: string): NativeTensor {
    if (!(tensor instanceof Tensor)) throw InvalidArgumentError.of(argument, tensor, 'a Tensor');
    const native = tensor.#native;
    if (native.disposed) throw new DisposedError(`argument '${argument}' is a Tensor that has been disposed`);
    return native;
  }
}

const bitsView = new DataView(new ArrayBuffer(4));

function bfloat16ToNumber(bits: number): number {
  bitsView.setUint32(0, bits << 16);
  return bitsView.getFloat32(0);
}

function halfToNumber(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

/** Number of tensors alive in native memory (for leak checks). */
export function liveTensorCount(): number {
  return binding.NativeTensor.liveCount();
}

const TYPED_ARRAYS = [
  Float32Array, Float64Array, BigInt64Array, BigUint64Array, Int32Array, Uint32Array, Int16Array, Uint16Array, Int8Array, Uint8Array, Uint8ClampedArray,
] as const;

function unshared(typed: TensorTypedArray): TensorTypedArray {
  // Buffer is a Uint8Array: the copy is a plain Uint8Array.
  const Kind = TYPED_ARRAYS.find((C) => typed instanceof C) as unknown as (new (length: number) => TensorTypedArray) | undefined;
  if (!Kind) return typed;
  const copy = new Kind(typed.length);
  (copy as unknown as { set(source: ArrayLike<unknown>): void }).set(typed as ArrayLike<unknown>);
  return copy;
}

/** The integer dtype whose values a typed array holds, if any (Uint16Array carries half-precision bits). */
function integerSource(typed: TensorTypedArray): IntegerDType | undefined {
  if (typed instanceof BigInt64Array) return 'int64';
  if (typed instanceof Int32Array) return 'int32';
  if (typed instanceof Int16Array) return 'int16';
  if (typed instanceof Int8Array) return 'int8';
  if (typed instanceof Uint8Array) return 'uint8';
  return undefined;
}

/** A cast into an integer dtype must not wrap or invent values: check every item the target cannot hold. */
function checkIntegerCast(typed: TensorTypedArray, target: IntegerDType): void {
  if (typed instanceof Uint16Array) return; // half-precision bits: the addon asks for a float dtype
  const source = integerSource(typed);
  if (source !== undefined) {
    const [lo, hi] = INTEGER_RANGES[source];
    const [tlo, thi] = INTEGER_RANGES[target];
    if (lo >= tlo && hi <= thi) return; // widening: every value fits
  }
  const values = typed as ArrayLike<number | bigint>;
  for (let i = 0; i < values.length; i++) {
    if (!fitsInteger(values[i], target, true)) throw valueError('data', i, values[i], target);
  }
}

function nestedPosition(index: number, shape: readonly number[]): string {
  const parts: number[] = [];
  for (let d = shape.length - 1; d >= 0; d--) {
    parts.unshift(shape[d] === 0 ? 0 : index % shape[d]);
    index = shape[d] === 0 ? 0 : Math.floor(index / shape[d]);
  }
  return parts.map((p) => `[${p}]`).join('');
}

function flatten(data: readonly unknown[]): { flat: unknown[]; inferred: number[] } {
  const inferred: number[] = [];
  let level: unknown = data;
  while (Array.isArray(level)) {
    inferred.push(level.length);
    level = level[0];
  }
  const flat: unknown[] = [];
  const walk = (node: unknown, depth: number, where: string): void => {
    if (depth === inferred.length) {
      if (Array.isArray(node)) throw InvalidArgumentError.of(`data${where}`, node, 'a scalar (the array is deeper than its first row)');
      flat.push(node);
      return;
    }
    if (!Array.isArray(node) || node.length !== inferred[depth]) {
      throw InvalidArgumentError.of(`data${where}`, node, `an array of length ${inferred[depth]} (nested arrays must be rectangular)`);
    }
    node.forEach((child, i) => walk(child, depth + 1, `${where}[${i}]`));
  };
  walk(data, 0, '');
  return { flat, inferred };
}

export type { DType, TensorTypedArray, TypedArrayOf };
