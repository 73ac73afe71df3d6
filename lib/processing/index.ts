// Preprocessing as transformers' Blip2Processor does it: images (BlipImageProcessor) and text (the tokenizer).
export { Blip2Processor, IMAGE_TOKEN } from './processor';
export type { Blip2ProcessorOutput, ProcessOptions } from './processor';
export { BlipImageProcessor, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PIL_RESAMPLE, pixelLut } from './image-processor';
export type { BlipImageProcessorConfig, PixelDType, PreprocessOptions } from './image-processor';
export { PreTrainedTokenizer } from './tokenizer';
export type { BatchEncoding, DecodeOptions, PaddingStrategy, TokenIds, TokenizeOptions, TokenizerOptions, TruncationStrategy } from './tokenizer';
export { TEXT_LIMITS } from './tokenizer-core';
export { decodeImage, DEFAULT_MAX_PIXELS, DEFAULT_MAX_TOTAL_PIXELS, MAX_CONCURRENT_DECODES } from './image-decode';
export type { DecodedImage, ImageInput, RawImage } from './image-decode';
