import type { NativeTensor } from '../../typings/binding';
import { DisposedError, InvalidArgumentError } from '../errors';
import { binding } from '../native/binding';
import { type DType, type TensorTypedArray, type TypedArrayOf, requireDType, typedArrayFromList } from './dtype';

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
   * `dtype`.
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
      const converted = typedArrayFromList(flat, dtype, 'data');
      return new Tensor<D>(binding.NativeTensor.fromData(converted.data, [...(shape ?? inferred)], converted.dtype, options.device));
    }
    if (!ArrayBuffer.isView(data) || data instanceof DataView) {
      throw InvalidArgumentError.of('data', data, 'a TypedArray, a Buffer or a (nested) array of numbers');
    }
    const typed = data as unknown as TensorTypedArray;
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
