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
  /** A view of `length` entries of dimension `dim` from `start` (no copy). */
  narrow(dim: number, start: number, length: number): Promise<NativeTensor>;
  /** A view of entry `index` of dimension `dim`, dropping that dimension (no copy). */
  select(dim: number, index: number): Promise<NativeTensor>;
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

/** The weights to bind into a weight-free module of a model folder (ScriptModule.load of lib's model classes). */
export interface NativeModuleWeights {
  weights: NativeWeights;
  /** Floating weights run in this dtype (keepFloat32 ones stay float32 in float16). */
  dtype: NativeDType;
  /** [parameter path inside the module, index into tensors]. */
  parameters: Array<[string, number]>;
  /** The vision attention through sdpa instead of transformers' eager ops. */
  fusedAttention?: boolean;
}

export interface NativeScriptModuleConstructor {
  /** `onProgress(boundBytes)`: after each weight tensor is bound. */
  load(path: string, device: string, weights?: NativeModuleWeights, onProgress?: (boundBytes: number) => void): Promise<NativeScriptModule>;
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
  /** Bytes of the KV caches of the models loaded now. */
  kvCacheBytes: number;
  generatedTokens: number;
  /** Bytes the decoding loops read from tensors into host memory (the chosen ids), on any device. */
  decodeHostReadBytes: number;
  decodeSteps: number;
  pendingCpuTasks: number;
  /**
   * libtorch's CPU allocator as the addon sets it (native/core/cpu_tensor_cache.h): blocks of 256 KB
   * and more are mapped by it and kept for reuse when freed; idle ones go back to the kernel after a
   * second without CPU work and when a model is disposed. `installed` false: BLIP2_CPU_TENSOR_CACHE=off.
   */
  cpuTensorCache: {
    installed: boolean;
    /** Mapped now: blocks held by tensors plus idle ones. */
    mappedBytes: number;
    /** Mapped now and free for reuse. */
    idleBytes: number;
    /** Allocations served from an idle block, since the process started. */
    reuses: number;
    /** Allocations that mapped a new block, since the process started. */
    maps: number;
  };
}

export interface NativeVersions {
  libtorch: string;
  /** The instruction set of blip2::linear's CPU kernels here: 'avx512', 'avx2' or 'none'. */
  linearKernel: 'avx512' | 'avx2' | 'none';
  /** Whether this libtorch has oneDNN's matmul (mkldnn::_linear_pointwise), the third path timed at load. */
  onednnLinear: boolean;
  cuda: string | null;
  builtWithCuda: boolean;
}

/** 8-bit interleaved pixels as decoded: channels 1 = grey, 2 = grey + alpha, 3 = RGB, 4 = RGBA; rows packed. */
export interface NativeImage {
  data: Uint8Array;
  width: number;
  height: number;
  channels: 1 | 2 | 3 | 4;
  /** 4 channels of raw C, M, Y, K: converted with PIL's CMYK → RGB formula. */
  cmyk?: boolean;
  /** RGBA pixels with alpha 0 take this colour before alpha is dropped (a GIF's transparent index in PIL). */
  transparentColour?: [number, number, number];
}

export interface NativePreprocessOptions {
  /** PIL-exact resize of the RGB image (PIL's resample number 0..5); null keeps the size (all images must then match). */
  resize: { width: number; height: number; filter: number } | null;
  /** 3 x 256 values: lut[c * 256 + v] is the final value (rescaled and normalized) of level v in channel c. */
  lut: Float32Array;
  /** A floating dtype; default float32. */
  dtype?: NativeDType;
  /** Default 'cpu'. */
  device?: string;
  /** Images with more pixels are rejected; default 100,000,000. */
  maxPixels?: number;
}

/** The safetensors files of a model folder and the tensors in them (lib reads their headers). */
export interface NativeWeights {
  files: Array<{ path: string; bytes: number }>;
  tensors: Array<{
    key: string;
    /** Index into files. */
    file: number;
    /** Byte offset from the start of the file. */
    offset: number;
    nbytes: number;
    dtype: NativeDType;
    shape: number[];
    /** Stays float32 when the model runs in float16 (transformers 5's _keep_in_fp32_modules). */
    keepFloat32: boolean;
  }>;
}

/** A weight-free TorchScript file and its parameters: [path inside the module, index into weights.tensors]. */
export interface NativeModuleSpec {
  path: string;
  parameters: Array<[string, number]>;
}

/** What lib reads from manifest.json for the native runtime (native code parses no JSON). */
export interface NativeModelSpec {
  /** 'opt': decoder-only; 't5': encoder-decoder (Flan-T5). */
  architecture: 'opt' | 't5';
  weights: NativeWeights;
  modules: { imageEncoder: NativeModuleSpec; languageModel: NativeModuleSpec };
  device: string;
  /** The dtype to run in (the export's, or a cast of it). */
  dtype: NativeDType;
  numLayers: number;
  numHeads: number;
  headDim: number;
  embedDim: number;
  vocabSize: number;
  maxLength: number;
  numQueryTokens: number;
  imageHeight: number;
  imageWidth: number;
  imageTokenIndex: number | null;
  /** The vision attention through sdpa instead of transformers' eager ops. */
  fusedAttention?: boolean;
  /** -1: none (T5). */
  bosTokenId: number;
  /** The first end-of-sequence id, or -1 (T5's default prompt ends with it). */
  eosTokenId: number;
  /** T5: the decoder's first input. */
  decoderStartTokenId?: number;
  /** T5: encoder positions (image queries + prompt) a cache slot holds. */
  maxEncoderLength?: number;
}

/** Generation options after lib merged them with generation_config.json and validated them. */
export interface NativeGenerateOptions {
  maxNewTokens: number;
  minNewTokens: number;
  doSample: boolean;
  temperature: number;
  topK: number;
  topP: number;
  repetitionPenalty: number;
  numBeams: number;
  lengthPenalty: number;
  earlyStopping: boolean | 'never';
  numReturnSequences: number;
  eosTokenId: number[];
  padTokenId: number;
  seed?: number;
}

/** New tokens of one decoding step: `tokens[i]` extends sequence `sequences[i]`. */
export interface NativeStepEvent {
  step: number;
  sequences: number[];
  tokens: number[];
}

export interface NativeGenerateResult {
  /** [rows, promptLength + newTokens] int64 on the CPU. */
  sequences: NativeTensor;
  /** Beam search only: [rows] float32, the length-normalised score of each returned sequence. */
  sequencesScores: NativeTensor | null;
}

/** What the load-time timing chose for one weight shape of the model (image encoder and language model; native/kernels/linear.h). */
export interface NativeLinearDecision {
  outFeatures: number;
  inFeatures: number;
  dtype: NativeDType;
  /** The row bucket timed: products of up to 1, 4, 16, 64 rows, or (256) any more. */
  rows: number;
  /** Milliseconds per product: at::linear, blip2::linear's kernel, oneDNN's matmul (0 when not timed or it cannot run here). */
  plainMs: number;
  kernelMs: number;
  onednnMs: number;
  /** The path the model's products of this shape and rows take: the fastest timed, or the one forced by
   * BLIP2_LINEAR_KERNEL. Up to 4 rows, where the kernel won, it and 'kernel-prefetch' (the same results,
   * with software prefetch of the next weight rows) are compared on the first decode products and the
   * faster kept: 'kernel' may become 'kernel-prefetch' once the model has decoded. */
  path: LinearPathName;
}

export type LinearPathName = 'plain' | 'kernel' | 'onednn' | 'kernel-prefetch';

/** What the load-time timing chose for one of the language model's attention operations on the KV cache. */
export interface NativeAttentionDecision {
  /** 'scores': a query row times the cached keys (q · Kᵀ); 'values': the probabilities times the cached values;
   * 'cache-write': the new keys and values copied into the cache (index_copy_). */
  product: 'scores' | 'values' | 'cache-write';
  dtype: NativeDType;
  headDim: number;
  /** Milliseconds per call for 1 and 16 rows (every head, 64 cached positions): libtorch's (at::matmul,
   * index_copy_) and the runtime's kernel (0 when not timed or it cannot run here). */
  plainMs: { 1: number; 16: number };
  kernelMs: { 1: number; 16: number };
  /** 'kernel' where it was at least as fast at both row counts (or BLIP2_LINEAR_KERNEL=on), else 'plain'. */
  path: 'plain' | 'kernel';
}

export interface NativeBlip2Model {
  readonly device: string;
  readonly dtype: NativeDType;
  readonly linearKernels: NativeLinearDecision[];
  readonly attentionKernels: NativeAttentionDecision[];
  /** pixel values → language_model_inputs [B, Q, E] (vision model, Q-Former, projection). */
  encodeImages(pixelValues: NativeTensor, cancelToken?: NativeCancelToken): Promise<NativeTensor>;
  /** Hugging Face's forward: logits [B, T (+Q for inputs without <image> tokens), V] float32. */
  forward(pixelValues: NativeTensor, inputIds: NativeTensor | null, attentionMask: NativeTensor | null,
    decoderInputIds: NativeTensor | null, cancelToken?: NativeCancelToken): Promise<NativeTensor>;
  /**
   * Queues the call on the model's scheduler (continuous batching with every other call); `onStep`
   * sees each step's tokens (not for beam search). Throws QueueFull / Disposed / too many sequences
   * at once. With `stopOnAbort`, a cancelled call resolves with its tokens so far.
   */
  generate(pixelValues: NativeTensor, inputIds: NativeTensor | null, attentionMask: NativeTensor | null,
    options: NativeGenerateOptions, onStep: ((event: NativeStepEvent) => void) | null,
    cancelToken: NativeCancelToken | undefined, stopOnAbort: boolean): Promise<NativeGenerateResult>;
  /** Rejects queued and running calls with DisposedError, frees cache and weights; resolves once freed. */
  dispose(): Promise<void>;
  stats(): NativeModelStats;
  /** The model's own modules (same weights, no copy) for feature methods: vision_model, qformer, text_hidden_states... */
  modules(): { imageEncoder: NativeScriptModule; languageModel: NativeScriptModule };
}

/** The scheduler of one model (native/blip2/scheduler.h), sized by lib. */
export interface NativeSchedulerOptions {
  /** KV-cache slots: sequences decoded together at most. */
  slots: number;
  /** Positions per slot. */
  maxLength: number;
  maxQueue: number;
  /** Prompt tokens prefilled per cycle while sequences decode; absent: chosen at load (native/blip2/scheduler.h). */
  prefillChunk?: number;
  /** Images encoded together per cycle at most while sequences decode; absent: chosen at load. */
  encodeBatch?: number;
  /** Vision layers of an encode per cycle while sequences decode; absent: from measured costs (CPU), whole (CUDA). */
  encodeLayersPerStep?: number;
  /** Work for arriving calls per cycle beside the decode step, in pure decode steps (CPU); absent: 2. */
  stallBudget?: number;
  /** Microseconds an idle model waits for more calls to encode with the first. */
  batchWaitUs: number;
}

export interface NativeModelStats {
  disposed: boolean;
  /** Calls waiting for slots. */
  queued: number;
  /** Calls admitted (prefilling or decoding). */
  runningCalls: number;
  /** Sequences in the last decode step. */
  runningSequences: number;
  /** Prompts still being written into the cache. */
  prefillingRows: number;
  slotsInUse: number;
  slots: number;
  maxLength: number;
  /** Bytes of the model's KV cache (allocated once; on the CPU only filled positions are resident). */
  kvCacheBytes: number;
  completedCalls: number;
  failedCalls: number;
  decodeSteps: number;
  generatedTokens: number;
  prefillTokens: number;
  /** Prompt positions computed as padding: a prefill forward pads its rows to its widest (OPT; rows of very different lengths go in separate forwards). */
  prefillPaddingTokens: number;
  /** Prompt positions (padding included) computed inside decode steps: while sequences decode, an OPT model exported with the `step` method writes one chunk of prompts per step in the step's own language-model call. */
  stepPrefillTokens: number;
  /** Decoded tokens per second over recent steps (moving average). */
  tokensPerSecond: number;
  lastStepMs: number;
  /** Most sequences one decode step has carried. */
  largestStepRows: number;
  /** Image encodes made to admit calls (all waiting images that fit go through one; on the CPU, while sequences decode, in stages of a few vision layers per step). */
  imageEncodes: number;
  /** Images through those encodes (encodedImages / imageEncodes: the mean encode batch). */
  encodedImages: number;
  /** Images in the staged encode now (0: none in progress). */
  encodingImages: number;
  /** Scheduler cycles that ran vision layers of a staged encode beside decoding sequences. */
  stagedEncodeCycles: number;
  /** Prompt positions the next decode step may carry: prefillChunk, or on the CPU by default what adds about one pure decode step, from the measured costs. */
  stepPrefillBudget: number;
}

export interface NativeBlip2ModelConstructor {
  /** `onProgress(boundBytes)`: as weights are bound (at most every 1% of spec.weights' bytes). */
  load(spec: NativeModelSpec, scheduler: NativeSchedulerOptions, cancelToken: NativeCancelToken | undefined,
    onProgress?: (boundBytes: number) => void): Promise<NativeBlip2Model>;
}

export type ErrorFactory = (code: string, message: string, details: Record<string, string>) => Error;

export interface NativeBinding {
  NativeTensor: NativeTensorConstructor;
  NativeScriptModule: NativeScriptModuleConstructor;
  NativeCancelToken: new () => NativeCancelToken;
  NativeBlip2Model: NativeBlip2ModelConstructor;
  setErrorFactory(factory: ErrorFactory): void;
  devices(): string[];
  versions(): NativeVersions;
  stats(): NativeStats;
  setNumThreads(threads: number): Promise<number>;
  /** Process exit (main thread): stops every executor after its current step, before static destructors run. */
  shutdownForExit(): void;
  /** Tests only: x·weightᵀ + bias through one CPU path: blip2::linear's kernel, oneDNN's matmul or at::linear ('plain'). */
  linearForTesting(x: NativeTensor, weight: NativeTensor, bias: NativeTensor | null, path: LinearPathName): Promise<NativeTensor>;
  /** Tests only: a × (the first `positions` rows of `b`, transposed when `transpose`) by at::matmul or the attention kernel. */
  attentionMatmulForTesting(a: NativeTensor, b: NativeTensor, transpose: boolean, positions: number, path: 'plain' | 'kernel'): Promise<NativeTensor>;
  /** Tests only: a copy of `self` after self.index_copy_(0, index, source) by libtorch or the cache-write kernel. */
  cacheWriteForTesting(self: NativeTensor, index: NativeTensor, source: NativeTensor, path: 'plain' | 'kernel'): Promise<NativeTensor>;
  getNumThreads(): Promise<number>;
  /**
   * BlipImageProcessor's pixel pipeline: convert("RGB") (alpha dropped) and PIL-exact resize on a CPU pool,
   * then one step on the device's executor (upload uint8, LUT, [B,3,H,W], cast). Errors name the image index.
   */
  preprocessImages(images: NativeImage[], options: NativePreprocessOptions, cancelToken?: NativeCancelToken): Promise<NativeTensor>;
}
