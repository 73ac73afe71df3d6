// The parts of Hugging Face's Blip2Config (config.json) users reach for, with the file's own
// snake_case names. Everything else in the file is kept as is.
export interface Blip2VisionConfig {
  hidden_size?: number;
  intermediate_size?: number;
  num_hidden_layers?: number;
  num_attention_heads?: number;
  image_size?: number;
  patch_size?: number;
  [key: string]: unknown;
}

export interface Blip2QFormerConfig {
  hidden_size?: number;
  num_hidden_layers?: number;
  num_attention_heads?: number;
  cross_attention_frequency?: number;
  [key: string]: unknown;
}

export interface Blip2TextConfig {
  model_type?: string;
  hidden_size?: number;
  num_hidden_layers?: number;
  vocab_size?: number;
  max_position_embeddings?: number;
  [key: string]: unknown;
}

/** The checkpoint's config.json (transformers' Blip2Config), as exported with the model. */
export interface Blip2Config {
  model_type?: string;
  architectures?: string[];
  num_query_tokens?: number;
  image_token_index?: number | null;
  vision_config?: Blip2VisionConfig;
  qformer_config?: Blip2QFormerConfig;
  text_config?: Blip2TextConfig;
  [key: string]: unknown;
}

/** generation_config.json (transformers' GenerationConfig), snake_case as in the file. */
export interface GenerationConfig {
  max_length?: number;
  max_new_tokens?: number;
  min_new_tokens?: number;
  do_sample?: boolean;
  temperature?: number;
  top_k?: number;
  top_p?: number;
  repetition_penalty?: number;
  num_beams?: number;
  length_penalty?: number;
  early_stopping?: boolean | 'never';
  num_return_sequences?: number;
  bos_token_id?: number;
  eos_token_id?: number | number[];
  pad_token_id?: number;
  [key: string]: unknown;
}
