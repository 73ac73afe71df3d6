// blip2-node: BLIP-2 vision-language inference for Node.js over libtorch.
export * from './errors';
export { Tensor, liveTensorCount } from './tensor/tensor';
export type { TensorInput, TensorOptions } from './tensor/tensor';
export type { DType, TensorTypedArray, TypedArrayOf } from './tensor/dtype';
export { ScriptModule } from './runtime/script-module';
export type { ScriptInput, ScriptOutput } from './runtime/script-module';
export { devices, cudaAvailable, versions, setNumThreads, getNumThreads } from './runtime/device';
export type { Versions } from './runtime/device';
export { stats } from './runtime/stats';
export type { RuntimeStats } from './runtime/stats';
export {
  Blip2ForConditionalGeneration, Blip2Model, Blip2VisionModel, Blip2QFormerModel, Blip2ForImageTextRetrieval,
  Blip2TextModelWithProjection, Blip2VisionModelWithProjection,
} from './models/blip2/modeling-blip2';
export type {
  Blip2Inputs, FromPretrainedOptions, GenerateOutput, ModelStats, FeatureModelOptions, CallOptions, ModelOutputWithPooling,
  ImageTextRetrievalOutput, LoadProgress,
} from './models/blip2/modeling-blip2';
export type { TokenDelta } from './generation/streaming';
export {
  PreTrainedConfig, Blip2Config, Blip2VisionConfig, Blip2QFormerConfig, OPTConfig, T5Config, GenerationConfig,
} from './models/blip2/configuration';
export type {
  ConfigJSON, ConfigClass, PreTrainedConfigJSON, Blip2ConfigJSON, Blip2VisionConfigJSON, Blip2QFormerConfigJSON, OPTConfigJSON, T5ConfigJSON,
  GenerationConfigJSON, Blip2TextConfig,
} from './models/blip2/configuration';
export type { GenerateOptions, GenerationStep } from './generation/options';
export { readModelFolder } from './models/model-folder';
export type { Manifest, ModelFolder } from './models/model-folder';
export {
  Blip2Processor, BlipImageProcessor, PreTrainedTokenizer, IMAGE_TOKEN, decodeImage, TEXT_LIMITS, DEFAULT_MAX_PIXELS, DEFAULT_MAX_TOTAL_PIXELS,
  MAX_CONCURRENT_DECODES,
} from './processing';
export type {
  Blip2ProcessorOutput, ProcessOptions, BlipImageProcessorConfig, PixelDType, PreprocessOptions, BatchEncoding, DecodeOptions,
  PaddingStrategy, TruncationStrategy, TokenizeOptions, TokenizerOptions, TokenIds, DecodedImage, ImageInput, RawImage,
} from './processing';
