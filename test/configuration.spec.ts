// The configuration classes against transformers 5.18's own (Blip2Config(**d).to_dict(),
// GenerationConfig(**d).to_dict() and their attributes, computed once per run by the project's
// Python), round trips, fromPretrained() and bad input.
//
// Compared: every key transformers writes, except the two it adds that we write only when the
// input had them: transformers_version (to_dict() writes its own version) and _name_or_path
// (to_dict() writes ''). Keys we keep that transformers drops on reading (generation parameters
// in a transformers 4 config.json, _commit_hash) are checked to be the input's own.
import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import {
  Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, GenerationConfig, InvalidArgumentError, ModelLoadError, OPTConfig,
  PreTrainedConfig, T5Config,
} from '../lib';
import type { ConfigJSON } from '../lib';
import { FIXTURES_DIR, REPO_ROOT, runPython } from './support/python';

const TINY_RANDOM_OPT = path.join(REPO_ROOT, 'models', 'tiny-random-opt');
const FIXTURE_CONFIG = path.join(FIXTURES_DIR, 'tiny-opt', 'config.json');
const readJsonFile = (file: string): ConfigJSON => JSON.parse(fs.readFileSync(file, 'utf8')) as ConfigJSON;

/** Keys transformers' to_dict() adds that toJSON() writes only when the input had them. */
const ADDED_BY_TRANSFORMERS = new Set(['transformers_version', '_name_or_path']);
const SUB_CONFIGS = ['vision_config', 'qformer_config', 'text_config'] as const;

const BLIP2_CASES: Record<string, ConfigJSON> = {
  defaults: {},
  'tiny OPT (test/fixtures/tiny-opt)': readJsonFile(FIXTURE_CONFIG),
  'tiny T5': {
    architectures: ['Blip2ForConditionalGeneration'],
    num_query_tokens: 8,
    image_token_index: 32100,
    torch_dtype: 'bfloat16',
    vision_config: { hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, image_size: 30, patch_size: 6 },
    qformer_config: { hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 64, cross_attention_frequency: 1, encoder_hidden_size: 999 },
    text_config: {
      model_type: 't5', vocab_size: 32128, d_model: 32, d_kv: 8, d_ff: 64, num_layers: 2, num_heads: 4, feed_forward_proj: 'gated-gelu',
      tie_word_embeddings: false, decoder_start_token_id: 0, dropout_rate: 0.0,
    },
  },
  'T5 with attribute_map aliases': {
    text_config: { model_type: 't5', hidden_size: 48, num_hidden_layers: 3, num_attention_heads: 6, head_dim: 8, feed_forward_proj: 'gated-silu' },
  },
  'image-text retrieval (use_qformer_text_input, image_text_hidden_size)': {
    architectures: ['Blip2ForImageTextRetrieval'],
    image_text_hidden_size: 24,
    num_query_tokens: 4,
    vision_config: { hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, image_size: 28, patch_size: 14 },
    qformer_config: {
      use_qformer_text_input: true, hidden_size: 32, vocab_size: 100, max_position_embeddings: 40, num_hidden_layers: 2,
      num_attention_heads: 4, intermediate_size: 37,
    },
  },
  'unknown extra keys and aliases': {
    custom_top: { nested: [1, { a: null }], s: 'x' },
    flag: true,
    image_token_id: 7,
    image_token_index: 3,
    num_labels: 3,
    name_or_path: 'some/where',
    use_decoder_only_language_model: false,
    is_encoder_decoder: true,
    text_config: { my_key: 'x', hidden_size: 64, word_embed_proj_dim: null, eos_token_id: [2, 3] },
    vision_config: { extra_vision: 3, image_size: [32, 48] },
    qformer_config: { q_extra: [] },
  },
  'transformers 4 file (generation parameters, _commit_hash)': {
    max_length: 30,
    _commit_hash: 'abc123',
    text_config: {
      _name_or_path: 'facebook/opt-2.7b', max_length: 20, num_beams: 1, do_sample: false, prefix: '</s>', add_cross_attention: false,
      torchscript: false, use_cache: true,
    },
  },
};

/** Keys transformers drops on reading that toJSON() keeps, by case and config ('' for the top level). */
const KEPT_DROPPED: Record<string, Record<string, string[]>> = {
  'transformers 4 file (generation parameters, _commit_hash)': { '': ['max_length', '_commit_hash'], text_config: ['max_length', 'num_beams', 'do_sample'] },
};

const PARTS = {
  vision: { hidden_size: 24, intermediate_size: 48, num_hidden_layers: 1, num_attention_heads: 2, image_size: 28, patch_size: 7 },
  qformer: { hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, encoder_hidden_size: 5 },
  text: { vocab_size: 99, d_model: 16, num_layers: 1, num_heads: 2, d_kv: 8, feed_forward_proj: 'gated-gelu' },
  extra: { num_query_tokens: 4, image_token_index: 98 },
};

const GENERATION_CASES: Record<string, ConfigJSON> = {
  defaults: {},
  'models/tiny-random-opt': readJsonFile(path.join(TINY_RANDOM_OPT, 'generation_config.json')),
  'every parameter we use, and an unknown key': {
    max_new_tokens: 30, num_beams: 3, early_stopping: 'never', do_sample: false, temperature: 0.7, top_k: 10, top_p: 0.9,
    repetition_penalty: 1.2, length_penalty: 0.8, no_repeat_ngram_size: 3, num_return_sequences: 2, eos_token_id: [1, 2], pad_token_id: 0,
    decoder_start_token_id: 0, min_new_tokens: 2, use_cache: false, max_length: 40, min_length: 1, bos_token_id: 5, custom: 'x',
    transformers_version: '5.0.0',
  },
};

/** Python attribute names whose camelCase accessor each class has. */
const ATTRIBUTES = {
  blip2: ['num_query_tokens', 'image_text_hidden_size', 'image_token_index', 'image_token_id', 'initializer_factor', 'initializer_range',
    'use_decoder_only_language_model', 'is_encoder_decoder', 'architectures', 'model_type'],
  vision: ['hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'image_size', 'patch_size', 'hidden_act',
    'layer_norm_eps', 'attention_dropout', 'initializer_range', 'qkv_bias', 'is_encoder_decoder'],
  qformer: ['vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size', 'hidden_act', 'hidden_dropout_prob',
    'attention_probs_dropout_prob', 'max_position_embeddings', 'initializer_range', 'layer_norm_eps', 'pad_token_id',
    'cross_attention_frequency', 'encoder_hidden_size', 'use_qformer_text_input'],
  opt: ['vocab_size', 'hidden_size', 'num_hidden_layers', 'ffn_dim', 'max_position_embeddings', 'do_layer_norm_before', 'word_embed_proj_dim',
    'dropout', 'attention_dropout', 'num_attention_heads', 'activation_function', 'layerdrop', 'init_std', 'use_cache', 'pad_token_id',
    'bos_token_id', 'eos_token_id', 'enable_bias', 'layer_norm_elementwise_affine', 'tie_word_embeddings', 'is_encoder_decoder'],
  t5: ['vocab_size', 'd_model', 'hidden_size', 'd_kv', 'head_dim', 'd_ff', 'num_layers', 'num_hidden_layers', 'num_decoder_layers', 'num_heads',
    'num_attention_heads', 'relative_attention_num_buckets', 'relative_attention_max_distance', 'dropout_rate', 'layer_norm_epsilon',
    'initializer_factor', 'feed_forward_proj', 'dense_act_fn', 'is_gated_act', 'scale_decoder_outputs', 'tie_word_embeddings', 'use_cache',
    'pad_token_id', 'eos_token_id', 'decoder_start_token_id', 'classifier_dropout', 'is_decoder', 'is_encoder_decoder'],
  generation: ['max_length', 'max_new_tokens', 'min_length', 'min_new_tokens', 'early_stopping', 'do_sample', 'num_beams', 'use_cache',
    'temperature', 'top_k', 'top_p', 'repetition_penalty', 'length_penalty', 'no_repeat_ngram_size', 'num_return_sequences', 'bos_token_id',
    'eos_token_id', 'pad_token_id', 'decoder_start_token_id'],
};

const camel = (snake: string): string => snake.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());
const accessor = (config: object, snake: string): unknown => (config as Record<string, unknown>)[camel(snake)];

interface Blip2Reference {
  dict: ConfigJSON;
  /** transformers' to_dict() of Blip2Config(**json.loads(our toJSONString())). */
  reread: ConfigJSON;
  attrs: Record<'blip2' | 'vision' | 'qformer' | 'text', Record<string, unknown>>;
}
interface Reference {
  blip2: Record<string, Blip2Reference>;
  parts: { dict: ConfigJSON };
  generation: Record<string, { dict: ConfigJSON; effective: Record<string, unknown> }>;
}

// The inputs travel as JSON from JavaScript, where 1.0 reads as 1: as_python() gives a float field
// its float back (what json.load of the file gives). Our output travels as toJSONString() text, as is.
const PYTHON = String.raw`
import dataclasses, json, warnings
warnings.filterwarnings("ignore")
import transformers
transformers.logging.set_verbosity_error()
from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, GenerationConfig, OPTConfig, T5Config

data = json.loads(DATA)
names = data["attributes"]

def floats(cls, d):
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    return {k: float(v) if types.get(k) is float and type(v) is int else v for k, v in d.items()}

def as_python(d):
    d = floats(Blip2Config, d)
    for key, cls in (("vision_config", Blip2VisionConfig), ("qformer_config", Blip2QFormerConfig)):
        if isinstance(d.get(key), dict):
            d[key] = floats(cls, d[key])
    if isinstance(d.get("text_config"), dict):
        d["text_config"] = floats(T5Config if d["text_config"].get("model_type") == "t5" else OPTConfig, d["text_config"])
    return d

def attrs(obj, keys):
    return {k: getattr(obj, k, None) for k in keys}

def blip2(d):
    c = Blip2Config(**d)
    return c, {"blip2": attrs(c, names["blip2"]), "vision": attrs(c.vision_config, names["vision"]),
               "qformer": attrs(c.qformer_config, names["qformer"]), "text": attrs(c.text_config, names[c.text_config.model_type])}

out = {"blip2": {}, "generation": {}}
for name, d in data["blip2"].items():
    c, a = blip2(as_python(d))
    out["blip2"][name] = {"dict": c.to_dict(), "reread": Blip2Config(**json.loads(data["ours"][name])).to_dict(), "attrs": a}
p = data["parts"]
out["parts"] = {"dict": Blip2Config(vision_config=Blip2VisionConfig(**floats(Blip2VisionConfig, p["vision"])),
                                    qformer_config=Blip2QFormerConfig(**floats(Blip2QFormerConfig, p["qformer"])),
                                    text_config=T5Config(**floats(T5Config, p["text"])), **floats(Blip2Config, p["extra"])).to_dict()}
defaults = GenerationConfig._get_default_generation_params()
for name, d in data["generation"].items():
    g = GenerationConfig(**d)
    out["generation"][name] = {"dict": g.to_dict(),
                               "effective": {k: getattr(g, k) if getattr(g, k) is not None else defaults.get(k) for k in names["generation"]}}
print(json.dumps(out, default=str))
`;

function runReference(ours: Record<string, string>): Reference {
  const data = { blip2: BLIP2_CASES, ours, parts: PARTS, generation: GENERATION_CASES, attributes: ATTRIBUTES };
  // A JSON string literal is a valid Python string literal.
  const stdout = runPython(PYTHON.replace('DATA', JSON.stringify(JSON.stringify(data))));
  return JSON.parse(stdout) as Reference;
}

/**
 * Asserts that `ours` (toJSON()) has every key of `reference` (to_dict()) with its value, sub-configs
 * key by key; that any key of ours transformers lacks is the input's own (`keptDropped` lists
 * them); and that what transformers adds (transformers_version, _name_or_path) is ours only when
 * the input had it.
 */
function assertMatchesTransformers(ours: ConfigJSON, reference: ConfigJSON, input: ConfigJSON, where: string, keptDropped: string[] = []): void {
  for (const [key, value] of Object.entries(reference)) {
    if (ADDED_BY_TRANSFORMERS.has(key)) {
      // name_or_path is read as _name_or_path, as transformers does.
      const given = key === '_name_or_path' ? input._name_or_path ?? input.name_or_path : input[key];
      if (given !== undefined) assert.deepEqual(ours[key], given, `${where}${key}`);
      else assert.ok(!(key in ours), `${where}${key} is written though the input lacks it`);
      if (key === '_name_or_path' && given !== undefined) assert.equal(value, given, `${where}${key} as transformers`);
      continue;
    }
    assert.ok(key in ours, `${where}${key}: transformers writes it, toJSON() does not`);
    if ((SUB_CONFIGS as readonly string[]).includes(key) && where === '') continue;
    assert.deepStrictEqual(ours[key], value, `${where}${key}`);
  }
  const extra = Object.keys(ours).filter((key) => !(key in reference) && !ADDED_BY_TRANSFORMERS.has(key)).sort();
  assert.deepEqual(extra, [...keptDropped].sort(), `${where}: keys toJSON() keeps that transformers drops`);
  for (const key of extra) assert.deepStrictEqual(ours[key], input[key], `${where}${key} is the input's`);
}

describe('configuration classes (transformers 5.18 configuration_blip_2 / opt / t5 / GenerationConfig)', function () {
  this.timeout(120_000);
  let reference: Reference;
  const configs: Record<string, Blip2Config> = {};

  before(function () {
    const ours: Record<string, string> = {};
    for (const [name, input] of Object.entries(BLIP2_CASES)) {
      configs[name] = new Blip2Config(input);
      ours[name] = configs[name].toJSONString();
    }
    reference = runReference(ours);
  });

  describe('Blip2Config against transformers', () => {
    for (const name of Object.keys(BLIP2_CASES)) {
      it(`${name}: toJSON() has transformers' to_dict() keys and values`, () => {
        const input = BLIP2_CASES[name];
        const ours = configs[name].toJSON();
        const ref = reference.blip2[name].dict;
        const kept = KEPT_DROPPED[name] ?? {};
        assertMatchesTransformers(ours, ref, input, '', kept[''] ?? []);
        for (const sub of SUB_CONFIGS) {
          assertMatchesTransformers(ours[sub] as ConfigJSON, ref[sub] as ConfigJSON, (input[sub] ?? {}) as ConfigJSON, `${sub}.`, kept[sub] ?? []);
        }
      });

      it(`${name}: the camelCase accessors give transformers' attributes`, () => {
        const config = configs[name];
        const attrs = reference.blip2[name].attrs;
        const parts = { blip2: config, vision: config.visionConfig, qformer: config.qformerConfig, text: config.textConfig } as const;
        for (const [part, values] of Object.entries(attrs) as Array<[keyof typeof parts, Record<string, unknown>]>) {
          for (const [snake, value] of Object.entries(values)) {
            assert.deepStrictEqual(accessor(parts[part], snake), value, `${part}.${camel(snake)} (${snake})`);
          }
        }
      });

      it(`${name}: transformers reads toJSONString() back to the same config`, () => {
        assert.deepStrictEqual(reference.blip2[name].reread, reference.blip2[name].dict);
        assert.deepStrictEqual(JSON.parse(configs[name].toJSONString()), configs[name].toJSON());
      });

      it(`${name}: round-trips (new Blip2Config(toJSON()) equals it)`, () => {
        const config = configs[name];
        const again = new Blip2Config(config.toJSON());
        assert.ok(again.equals(config));
        assert.deepStrictEqual(again.toJSON(), config.toJSON());
        assert.ok(new Blip2VisionConfig(config.visionConfig.toJSON()).equals(config.visionConfig));
        assert.ok(new Blip2QFormerConfig(config.qformerConfig.toJSON()).equals(config.qformerConfig));
        const text = config.textConfig;
        assert.ok((text instanceof T5Config ? new T5Config(text.toJSON()) : new OPTConfig(text.toJSON())).equals(text));
      });
    }

    it('derives what transformers derives', () => {
      const t5 = configs['tiny T5'];
      assert.ok(t5.textConfig instanceof T5Config);
      assert.equal(t5.qformerConfig.encoderHiddenSize, 32, 'qformer encoder_hidden_size is the vision hidden size');
      assert.equal(t5.useDecoderOnlyLanguageModel, false);
      assert.equal(t5.isEncoderDecoder, true);
      assert.equal(t5.dtype, 'bfloat16', 'torch_dtype is read as dtype');
      assert.ok(!('torch_dtype' in t5.toJSON()));
      assert.equal(t5.textConfig.denseActFn, 'gelu_new');
      assert.equal(t5.textConfig.isGatedAct, true);
      assert.equal(t5.textConfig.scaleDecoderOutputs, false);
      assert.equal(t5.textConfig.tieWordEmbeddings, true);
      const aliases = configs['T5 with attribute_map aliases'].textConfig as T5Config;
      assert.deepEqual([aliases.dModel, aliases.numLayers, aliases.numDecoderLayers, aliases.numHeads, aliases.dKv], [48, 3, 6, 6, 8]);
      const defaults = configs.defaults;
      assert.ok(defaults.textConfig instanceof OPTConfig, 'text_config defaults to OPT');
      assert.equal(defaults.numQueryTokens, 32);
      assert.equal(defaults.imageTokenIndex, null);
      assert.equal(defaults.textConfig.wordEmbedProjDim, defaults.textConfig.hiddenSize);
      const extras = configs['unknown extra keys and aliases'];
      assert.equal(extras.imageTokenIndex, 7, 'image_token_id wins over image_token_index, as in transformers');
      assert.equal(extras.get('image_token_id'), 7);
      assert.ok(!('image_token_id' in extras.toJSON()));
      assert.equal(extras.useDecoderOnlyLanguageModel, false, "the file's use_decoder_only_language_model wins");
      assert.equal(extras.isEncoderDecoder, false, 'is_encoder_decoder is always the language model\'s');
      assert.deepEqual(extras.get('custom_top'), BLIP2_CASES['unknown extra keys and aliases'].custom_top);
      assert.equal(extras.get('_name_or_path'), 'some/where');
      assert.deepEqual(Object.keys(extras.get('id2label') as object), ['0', '1', '2'], 'num_labels sizes id2label');
    });

    it('fromVisionQformerTextConfigs() is Blip2Config(vision_config=..., qformer_config=..., text_config=..., **extra)', () => {
      const config = Blip2Config.fromVisionQformerTextConfigs(
        new Blip2VisionConfig(PARTS.vision), new Blip2QFormerConfig(PARTS.qformer), new T5Config(PARTS.text), PARTS.extra,
      );
      const ref = reference.parts.dict;
      const ours = config.toJSON();
      assertMatchesTransformers(ours, ref, PARTS.extra, '');
      for (const [sub, input] of [['vision_config', PARTS.vision], ['qformer_config', PARTS.qformer], ['text_config', PARTS.text]] as const) {
        assertMatchesTransformers(ours[sub] as ConfigJSON, ref[sub] as ConfigJSON, input, `${sub}.`);
      }
      assert.equal(config.qformerConfig.encoderHiddenSize, 24);
      assert.ok(Blip2Config.fromVisionQformerTextConfigs(new Blip2VisionConfig(), new Blip2QFormerConfig()).equals(new Blip2Config()));
    });
  });

  describe('GenerationConfig against transformers', () => {
    for (const name of Object.keys(GENERATION_CASES)) {
      it(`${name}: toJSON(), the accessors (with transformers' defaults) and the round trip`, () => {
        const input = GENERATION_CASES[name];
        const config = new GenerationConfig(input);
        const ours = config.toJSON();
        const { dict, effective } = reference.generation[name];
        for (const key of ATTRIBUTES.generation) assert.deepStrictEqual(ours[key], dict[key], key);
        for (const key of Object.keys(input)) {
          assert.deepStrictEqual(ours[key], input[key], `${key} is kept`);
          if (key !== 'transformers_version') assert.deepStrictEqual(ours[key], dict[key], `${key} as transformers`);
        }
        for (const [key, value] of Object.entries(effective)) assert.deepStrictEqual(accessor(config, key), value, camel(key));
        assert.ok(new GenerationConfig(ours).equals(config));
        assert.ok(new GenerationConfig(JSON.parse(config.toJSONString()) as ConfigJSON).equals(config));
      });
    }
  });

  describe('fromPretrained()', () => {
    function assertKeepsFile(config: PreTrainedConfig, file: ConfigJSON): void {
      const ours = config.toJSON();
      for (const [key, value] of Object.entries(file)) {
        if (key === 'torch_dtype') {
          assert.equal(ours.dtype, value, 'torch_dtype is written as dtype');
          continue;
        }
        assert.ok(key in ours, `${key} is kept`);
        if ((SUB_CONFIGS as readonly string[]).includes(key)) {
          for (const [subKey, subValue] of Object.entries(value as ConfigJSON)) {
            assert.deepStrictEqual((ours[key] as ConfigJSON)[subKey], subValue, `${key}.${subKey}`);
          }
        } else {
          assert.deepStrictEqual(ours[key], value, key);
        }
      }
    }

    it('reads models/tiny-random-opt (a model folder), keeping every key of its config.json', async () => {
      const config = await Blip2Config.fromPretrained(TINY_RANDOM_OPT);
      const file = readJsonFile(path.join(TINY_RANDOM_OPT, 'config.json'));
      assert.ok(config.equals(new Blip2Config(file)));
      assertKeepsFile(config, file);
      assert.equal(config.numQueryTokens, 6);
      assert.equal(config.imageTokenIndex, 380);
      assert.equal(config.transformersVersion, '4.45.1');
      assert.ok(config.textConfig instanceof OPTConfig);
      assert.equal(config.textConfig.hiddenSize, 48);
      const generation = await GenerationConfig.fromPretrained(TINY_RANDOM_OPT);
      assert.deepEqual([generation.eosTokenId, generation.padTokenId, generation.bosTokenId, generation.maxLength], [2, 1, 2, 20]);
      assert.equal(generation.get('_from_model_config'), true);
    });

    it('reads test/fixtures/tiny-opt/config.json (a file path) and its sub-configs as transformers does', async () => {
      const config = await Blip2Config.fromPretrained(FIXTURE_CONFIG);
      assertKeepsFile(config, readJsonFile(FIXTURE_CONFIG));
      assert.ok((await OPTConfig.fromPretrained(FIXTURE_CONFIG)).equals(config.textConfig), 'OPTConfig takes the part whose model_type is opt');
      assert.ok((await Blip2VisionConfig.fromPretrained(path.dirname(FIXTURE_CONFIG))).equals(config.visionConfig));
      // The Q-Former of a Blip2Config has encoder_hidden_size = the vision hidden size; this file agrees.
      assert.ok((await Blip2QFormerConfig.fromPretrained(FIXTURE_CONFIG)).equals(config.qformerConfig));
    });
  });

  describe('bad input', () => {
    let dir: string;
    before(() => { dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blip2-config-')); });
    after(() => fs.rmSync(dir, { recursive: true, force: true }));

    function assertField(build: () => unknown, argument: string, value: string, expected: string): void {
      assert.throws(build, (e: unknown) => {
        assert.ok(e instanceof InvalidArgumentError, String(e));
        assert.equal(e.code, 'ERR_BLIP2_INVALID_ARGUMENT');
        assert.deepEqual([e.argument, e.value, e.expected], [argument, value, expected]);
        assert.equal(e.message, `config field '${argument}' is ${value}; expected ${expected}`);
        return true;
      });
    }

    it('a known field of the wrong type is an InvalidArgumentError naming the field, value and expected type', () => {
      assertField(() => new OPTConfig({ hidden_size: '12' }), 'hidden_size', '"12"', 'an integer');
      assertField(() => new Blip2Config({ text_config: { num_hidden_layers: 2.5 } }), 'text_config.num_hidden_layers', '2.5', 'an integer');
      assertField(() => new Blip2Config({ vision_config: { image_size: 'big' } }), 'vision_config.image_size', '"big"', 'an integer or a list of integers');
      assertField(() => new Blip2Config({ qformer_config: { use_qformer_text_input: 1 } }), 'qformer_config.use_qformer_text_input', '1', 'a boolean');
      assertField(() => new Blip2Config({ num_query_tokens: null }), 'num_query_tokens', 'null', 'an integer');
      assertField(() => new Blip2Config({ image_token_index: '5' }), 'image_token_index', '"5"', 'an integer or null');
      assertField(() => new Blip2Config({ image_token_id: true }), 'image_token_id', 'true', 'an integer or null');
      assertField(() => new Blip2Config({ torch_dtype: 32 }), 'torch_dtype', '32', 'a string or null');
      assertField(() => new Blip2Config({ architectures: 'Blip2Model' }), 'architectures', '"Blip2Model"', 'a list of strings or null');
      assertField(() => new Blip2Config({ use_decoder_only_language_model: 'yes' }), 'use_decoder_only_language_model', '"yes"', 'a boolean');
      assertField(() => new Blip2Config({ vision_config: 5 }), 'vision_config', '5', 'an object or a Blip2VisionConfig');
      assertField(() => new Blip2Config({ text_config: { model_type: 'llama' } }), 'text_config.model_type', '"llama"',
        "'opt' or 't5' (the language models of the BLIP-2 checkpoints blip2-node runs)");
      assertField(() => new Blip2Config({ text_config: { model_type: 't5', hidden_size: -0.5 } }), 'text_config.hidden_size', '-0.5', 'an integer');
      assertField(() => new T5Config({ feed_forward_proj: 'gelu-gated' }), 'feed_forward_proj', '"gelu-gated"',
        "an activation 'gated-{ACT_FN}' or '{ACT_FN}', e.g. 'gated-gelu' or 'relu'");
      assertField(() => new Blip2Config({ foo: () => 1 }), 'foo', 'a function', 'a JSON value (null, a boolean, a number, a string, a list or an object)');
      assertField(() => new GenerationConfig({ num_beams: '4' }), 'num_beams', '"4"', 'an integer or null');
      assertField(() => new GenerationConfig({ early_stopping: 'sometimes' }), 'early_stopping', '"sometimes"', "true, false or 'never' or null");
      assertField(() => new GenerationConfig({ eos_token_id: [1, 'x'] }), 'eos_token_id', 'an array of length 2', 'an integer or a list of integers or null');
      assert.throws(() => new Blip2Config([] as unknown as ConfigJSON), InvalidArgumentError);
      assert.throws(() => new GenerationConfig(null as unknown as ConfigJSON), InvalidArgumentError);
    });

    it('fromVisionQformerTextConfigs() checks its arguments', () => {
      const vision = new Blip2VisionConfig();
      const qformer = new Blip2QFormerConfig();
      assert.throws(() => Blip2Config.fromVisionQformerTextConfigs({} as Blip2VisionConfig, qformer), /argument 'vision'/);
      assert.throws(() => Blip2Config.fromVisionQformerTextConfigs(vision, vision as unknown as Blip2QFormerConfig), /argument 'qformer'/);
      assert.throws(() => Blip2Config.fromVisionQformerTextConfigs(vision, qformer, qformer as unknown as T5Config), /argument 'text'/);
      assert.throws(() => Blip2Config.fromVisionQformerTextConfigs(vision, qformer, null, { text_config: {} }), /argument 'extra.text_config'/);
    });

    it('configs are immutable: toJSON() and get() give copies, accessors frozen values', () => {
      const config = new Blip2Config(BLIP2_CASES['unknown extra keys and aliases']);
      const json = config.toJSON();
      (json.text_config as ConfigJSON).hidden_size = 1;
      (config.get('custom_top') as { s: string }).s = 'changed';
      assert.equal(config.textConfig.hiddenSize, 64);
      assert.equal((config.get('custom_top') as { s: string }).s, 'x');
      assert.ok(Object.isFrozen(config.visionConfig.imageSize));
      assert.ok(Object.isFrozen(config.textConfig.eosTokenId));
    });

    it('fromPretrained() on a missing or damaged file is a ModelLoadError naming the file', async () => {
      const write = (name: string, text: string): string => {
        const sub = fs.mkdtempSync(path.join(dir, 'm-'));
        fs.writeFileSync(path.join(sub, name), text);
        return sub;
      };
      const rejectsNaming = async (promise: Promise<unknown>, file: string, ...parts: string[]) => {
        await assert.rejects(promise, (e: unknown) => {
          assert.ok(e instanceof ModelLoadError, String(e));
          assert.equal(e.file, file);
          for (const part of [file, ...parts]) assert.ok(e.message.includes(part), `${e.message} names ${part}`);
          return true;
        });
      };
      const empty = fs.mkdtempSync(path.join(dir, 'empty-'));
      await rejectsNaming(Blip2Config.fromPretrained(empty), path.join(empty, 'config.json'));
      await rejectsNaming(GenerationConfig.fromPretrained(empty), path.join(empty, 'generation_config.json'));
      const notJson = write('config.json', '{"num_query_tokens": 6,');
      await rejectsNaming(Blip2Config.fromPretrained(notJson), path.join(notJson, 'config.json'), 'damaged');
      const notObject = write('generation_config.json', '[1, 2]');
      await rejectsNaming(GenerationConfig.fromPretrained(notObject), path.join(notObject, 'generation_config.json'), 'not a JSON object');
      const badField = write('config.json', JSON.stringify({ text_config: { hidden_size: '12' } }));
      await rejectsNaming(Blip2Config.fromPretrained(badField), path.join(badField, 'config.json'), "'text_config.hidden_size'", '"12"', 'an integer');
      const badVision = write('config.json', JSON.stringify({ model_type: 'blip-2', vision_config: { hidden_size: 1.5 } }));
      await rejectsNaming(Blip2VisionConfig.fromPretrained(badVision), path.join(badVision, 'config.json'), "'vision_config.hidden_size'", '1.5');
      const badGeneration = write('generation_config.json', JSON.stringify({ top_k: 'many' }));
      await rejectsNaming(GenerationConfig.fromPretrained(badGeneration), path.join(badGeneration, 'generation_config.json'), "'top_k'", '"many"');
      await assert.rejects(Blip2Config.fromPretrained(''), InvalidArgumentError);
    });
  });
});
