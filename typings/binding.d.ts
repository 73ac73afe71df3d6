// The native binding (build/Release/blip2_node.node): the only contract between lib/ and native/.
// Everything asynchronous runs on a per-device executor thread and settles on the JS thread.
// Errors are created by the factory lib registers with setErrorFactory (codes in lib/errors.ts).

export type NativeDType = 'float32' | 'float16' | 'bfloat16' | 'float64' | 'int64' | 'int32' | 'int16' | 'int8' | 'uint8' | 'bool';

export type NativeTypedArray =
  | Float32Array | Float64Array | BigInt64Array | Int32Array | Int16Array | Int8Array | Uint8Array | Uint16Array;

export interface NativeTensor {
  readonly shape: number[];
  readonly dtype: NativeDType;
  /** 'cpu' or 'cuda:N'. */
  readonly device: string;
  readonly nbytes: number;
  readonly disposed: boolean;
  /** One copy, device or host memory → a new typed array (float16/bfloat16 as Uint16Array bits, bool as Uint8Array). */
  toArray(): Promise<NativeTypedArray>;
  to(device: string | undefined, dtype: NativeDType | undefined): Promise<NativeTensor>;
  /** Frees the tensor now (once the tasks already using it finish); idempotent. */
  dispose(): void;
}

export interface NativeTensorConstructor {
  /**
   * One copy in. `data`'s own element type is the source dtype (a Uint16Array needs dtype float16 or
   * bfloat16); `dtype` other than that casts. A non-CPU `device` uploads on that device's executor.
   */
  fromData(data: NativeTypedArray, shape: number[], dtype: NativeDType | undefined, device: string | undefined): NativeTensor;
  /** Tensors alive in native memory (handles not yet disposed or collected, plus those held by running tasks). */
  liveCount(): number;
}

/** A scalar, tensor, or (nested) list/tuple as a TorchScript method takes or returns them. */
export type ScriptValue = NativeTensor | number | boolean | string | null | ScriptValue[];

export interface NativeScriptModule {
  /** Method name → schema, e.g. "forward(Tensor x) -> Tensor". */
  readonly methods: Record<string, string>;
  readonly device: string;
  readonly path: string;
  /** Arguments are checked against the method's schema on the calling thread. */
  call(method: string, args: ScriptValue[], cancelToken?: NativeCancelToken): Promise<ScriptValue>;
  dispose(): void;
}

export interface NativeScriptModuleConstructor {
  load(path: string, device: string): Promise<NativeScriptModule>;
}

export interface NativeCancelToken {
  cancel(): void;
  readonly cancelled: boolean;
}

export interface NativeStats {
  liveTensors: number;
  deviceToHostBytes: number;
  hostToDeviceBytes: number;
  kvCacheAllocations: number;
  kvCacheBytes: number;
  generatedTokens: number;
  pendingCpuTasks: number;
}

export interface NativeVersions {
  libtorch: string;
  cuda: string | null;
  builtWithCuda: boolean;
}

export type ErrorFactory = (code: string, message: string, details: Record<string, string>) => Error;

export interface NativeBinding {
  NativeTensor: NativeTensorConstructor;
  NativeScriptModule: NativeScriptModuleConstructor;
  NativeCancelToken: new () => NativeCancelToken;
  setErrorFactory(factory: ErrorFactory): void;
  devices(): string[];
  versions(): NativeVersions;
  stats(): NativeStats;
  setNumThreads(threads: number): Promise<number>;
  getNumThreads(): Promise<number>;
}
