import type { NativeModuleWeights, NativeScriptModule, NativeTensor, ScriptValue } from '../../typings/binding';
import { InvalidArgumentError } from '../errors';
import { binding } from '../native/binding';
import { Tensor } from '../tensor/tensor';
import { requireSignal, withAbort } from './abort';
import { requireDeviceString } from './device';

/** An argument of ScriptModule.call(): tensors, numbers, booleans, strings, null/undefined (None) and lists of them. */
export type ScriptInput = Tensor | number | boolean | string | null | undefined | readonly ScriptInput[];
/** What ScriptModule.call() resolves to: a tensor, a scalar, null (None), or a list/tuple of them. */
export type ScriptOutput = Tensor | number | boolean | string | null | ScriptOutput[];

const NativeTensorClass = binding.NativeTensor as unknown as abstract new () => NativeTensor;

function toNative(value: ScriptInput, argument: string): ScriptValue {
  if (value instanceof Tensor) return Tensor.native(value, argument);
  if (Array.isArray(value)) return value.map((item, i) => toNative(item, `${argument}[${i}]`));
  if (value === undefined) return null;
  return value as ScriptValue;
}

function fromNative(value: ScriptValue): ScriptOutput {
  if (value instanceof NativeTensorClass) return Tensor.fromNative(value as NativeTensor);
  if (Array.isArray(value)) return value.map(fromNative);
  return value as ScriptOutput;
}

/** Frees every tensor inside a result nobody will read (an aborted call finishing late). */
export function disposeOutput(value: ScriptOutput): void {
  if (value instanceof Tensor) value.dispose();
  else if (Array.isArray(value)) value.forEach(disposeOutput);
}

/**
 * A TorchScript module (saved by torch.jit.save) loaded onto one device. Its methods run on that
 * device's executor thread; arguments are checked against each method's schema before they go.
 */
export class ScriptModule {
  readonly #native: NativeScriptModule;

  private constructor(native: NativeScriptModule) {
    this.#native = native;
  }

  /** Loads a TorchScript file onto `options.device` (default 'cpu'); `options.signal` (default none) aborts the load. */
  static async load(path: string, options: { device?: string; signal?: AbortSignal } = {}): Promise<ScriptModule> {
    if (typeof path !== 'string' || path.length === 0) throw InvalidArgumentError.of('path', path, 'a file path string');
    const device = requireDeviceString(options.device ?? 'cpu', 'options.device');
    const signal = requireSignal(options.signal, 'options.signal');
    const native = await withAbort(signal, () => binding.NativeScriptModule.load(path, device), (late) => late.dispose());
    return new ScriptModule(native);
  }

  /** @internal A module of a model folder with its weights bound (lib's model classes). */
  static async loadWithWeights(path: string, device: string, weights: NativeModuleWeights, signal?: AbortSignal,
    onProgress?: (boundBytes: number) => void): Promise<ScriptModule> {
    const native = await withAbort(signal, () => binding.NativeScriptModule.load(path, device, weights, onProgress), (late) => late.dispose());
    return new ScriptModule(native);
  }

  /** @internal A handle on a module another native object owns (a model's image encoder, say). */
  static fromNative(native: NativeScriptModule): ScriptModule {
    return new ScriptModule(native);
  }

  /** Method name → its TorchScript schema, e.g. `forward(Tensor x) -> Tensor`. */
  get methods(): Record<string, string> {
    return this.#native.methods;
  }
  /** The device the module runs on: 'cpu' or 'cuda:N'. */
  get device(): string {
    return this.#native.device;
  }
  /** The file the module was loaded from. */
  get path(): string {
    return this.#native.path;
  }

  /** Runs `method` with `args` (default none) on the module's executor thread; `options.signal` (default none) aborts it. */
  call(method: string, args: readonly ScriptInput[] = [], options: { signal?: AbortSignal } = {}): Promise<ScriptOutput> {
    if (!Array.isArray(args)) return Promise.reject(InvalidArgumentError.of('args', args, 'an array of arguments'));
    let signal: AbortSignal | undefined;
    let nativeArgs: ScriptValue[];
    try {
      signal = requireSignal(options.signal, 'options.signal');
      nativeArgs = args.map((arg, i) => toNative(arg, `args[${i}]`));
    } catch (e) {
      return Promise.reject(e);
    }
    return withAbort(
      signal,
      async (token) => fromNative(await this.#native.call(method, nativeArgs, token)),
      disposeOutput,
    );
  }

  /** Releases the module (its weights are freed once no running call uses them). */
  dispose(): void {
    this.#native.dispose();
  }

  /** dispose(), for `using` declarations. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}
