// Blip2Processor against transformers 4.45.1 (test/fixtures/tiny-opt-expected) and Pillow 9.4
// (test/fixtures/processor): pixel values, token ids, decoding, colour conversion, bad input.
import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';

import {
  AbortError,
  Blip2Processor,
  BlipImageProcessor,
  DTypeError,
  DeviceError,
  ImageDecodeError,
  InvalidArgumentError,
  ModelLoadError,
  PreTrainedTokenizer,
  Tensor,
  cudaAvailable,
  decodeImage,
  liveTensorCount,
} from '../lib';
import type { ImageInput, RawImage } from '../lib';
import { binding } from '../lib/native/binding';
import { pixelLut } from '../lib/processing';
import { expected, expectedTensorsFile, maxAbsDiff, rowsOf } from './support/fixtures';
import { FIXTURES_DIR, TINY_OPT_CHECKPOINT, tinyOptModel } from './support/python';

const IMAGES = { gradient: 'gradient_64x48.png', noise: 'noise_33x77.png', shapes: 'shapes_200x120.jpg' } as const;
type ImageName = keyof typeof IMAGES;
const imagePath = (name: ImageName): string => path.join(FIXTURES_DIR, 'images', IMAGES[name]);
const PROCESSOR_DIR = path.join(FIXTURES_DIR, 'processor');

function rgbFixture(name: ImageName): RawImage {
  const t = expectedTensorsFile().get(`rgb/${name}`);
  const [height, width] = t.shape;
  return { data: t.data as Uint8Array, width, height, channels: 3 };
}

async function floats(t: Tensor): Promise<Float32Array> {
  return (await t.toArray()) as Float32Array;
}

function rowOf(all: Float32Array, row: number, rows: number): Float32Array {
  const size = all.length / rows;
  return all.subarray(row * size, (row + 1) * size);
}

/** Records the parity numbers so the suite prints them once. */
const parity: string[] = [];

describe('Blip2Processor', function () {
  let processor: Blip2Processor;

  before(async () => {
    processor = await Blip2Processor.fromPretrained(TINY_OPT_CHECKPOINT);
  });

  after(() => {
    if (parity.length) console.log(`      parity: ${parity.join('; ')}`);
  });

  describe('loading (tiny-opt checkpoint folder)', () => {
    it('reads preprocessor_config, processor_config and the tokenizer files', () => {
      const ip = processor.imageProcessor;
      assert.deepEqual(ip.size, { height: 56, width: 56 });
      assert.equal(ip.resample, 3);
      assert.equal(ip.doResize && ip.doRescale && ip.doNormalize && ip.doConvertRgb, true);
      assert.equal(ip.rescaleFactor, 0.00392156862745098);
      assert.deepEqual(ip.imageMean, [0.48145466, 0.4578275, 0.40821073]);
      assert.equal(processor.numQueryTokens, 6);
      assert.equal(processor.imageTokenId, 380);
      assert.equal(processor.imageToken, '<image>');
      assert.equal(processor.tokenizer.paddingSide, 'left');
      assert.equal(processor.tokenizer.padTokenId, 1);
      assert.equal(processor.tokenizer.bosTokenId, 2);
      assert.equal(processor.tokenizer.length, expected().meta.len_tokenizer);
      assert.equal(processor.dtype, 'float32');
    });

    it("missing fields take transformers' defaults; legacy size forms are understood", () => {
      const ip = new BlipImageProcessor({});
      assert.deepEqual(ip.size, { height: 384, width: 384 });
      assert.equal(ip.resample, 3);
      assert.equal(ip.rescaleFactor, 1 / 255);
      assert.deepEqual(ip.imageMean, [0.48145466, 0.4578275, 0.40821073]);
      assert.deepEqual(ip.imageStd, [0.26862954, 0.26130258, 0.27577711]);
      assert.equal(ip.doResize && ip.doRescale && ip.doNormalize && ip.doConvertRgb, true);
      assert.deepEqual(new BlipImageProcessor({ size: 224 }).size, { height: 224, width: 224 });
      assert.deepEqual(new BlipImageProcessor({ size: [20, 30] }).size, { height: 20, width: 30 });
      assert.deepEqual(new BlipImageProcessor({ image_mean: 0.5, image_std: 0.25 }).imageMean, [0.5, 0.5, 0.5]);
      assert.throws(() => new BlipImageProcessor({ size: { shortest_edge: 224 } as never }), InvalidArgumentError);
      assert.throws(() => new BlipImageProcessor({ resample: 7 }), InvalidArgumentError);
      assert.throws(() => new BlipImageProcessor({ image_mean: [1, 2] }), InvalidArgumentError);
    });

    it('loads a blip2-node model folder (manifest.json + copied files) and takes its dtype', async function () {
      this.timeout(300_000);
      const dir = tinyOptModel();
      const fromModel = await Blip2Processor.fromPretrained(dir);
      assert.equal(fromModel.numQueryTokens, 6);
      assert.equal(fromModel.imageTokenId, 380);
      const out = await fromModel.process({ images: imagePath('gradient'), text: '' });
      assert.deepEqual(await rowsOf(out.inputIds), expected().processor_outputs['gradient/empty'].input_ids);
      out.pixelValues.dispose();
      out.inputIds.dispose();
      out.attentionMask.dispose();
    });

    it('a model folder whose manifest says float16 makes float16 pixel values by default', async () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blip2-proc-'));
      try {
        for (const f of ['preprocessor_config.json', 'processor_config.json', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json']) {
          fs.copyFileSync(path.join(TINY_OPT_CHECKPOINT, f), path.join(dir, f));
        }
        fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify({ format: 'blip2-node-model', format_version: 1, dtype: 'float16', num_query_tokens: 6, image_token_index: 380 }));
        const p = await Blip2Processor.fromPretrained(dir);
        assert.equal(p.dtype, 'float16');
        const pv = await p.imageProcessor.preprocess(imagePath('noise'), { dtype: p.dtype });
        assert.equal(pv.dtype, 'float16');
        pv.dispose();
        fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify({ dtype: 'float32', num_query_tokens: 6, image_token_index: 50265 }));
        await assert.rejects(Blip2Processor.fromPretrained(dir), (e: unknown) => e instanceof ModelLoadError && /image_token_index is 50265/.test(e.message));
        fs.rmSync(path.join(dir, 'tokenizer.json'));
        await assert.rejects(Blip2Processor.fromPretrained(dir), (e: unknown) => e instanceof ModelLoadError && /tokenizer\.json/.test(e.message));
        fs.writeFileSync(path.join(dir, 'preprocessor_config.json'), '{ not json');
        await assert.rejects(Blip2Processor.fromPretrained(dir), ModelLoadError);
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
      await assert.rejects(Blip2Processor.fromPretrained(path.join(os.tmpdir(), 'no-such-blip2-folder')), ModelLoadError);
    });
  });

  describe('pixel values (transformers BlipImageProcessor: PIL bicubic 56x56, /255, CLIP mean/std)', () => {
    for (const name of Object.keys(IMAGES) as ImageName[]) {
      it(`${name}: from the file path, the encoded bytes and the decoded rgb/${name} pixels`, async () => {
        const want = expectedTensorsFile().get(`pixel_values/${name}`);
        const sources: Array<[string, ImageInput]> = [
          ['path', imagePath(name)],
          ['bytes', fs.readFileSync(imagePath(name))],
          ['rgb', rgbFixture(name)],
        ];
        for (const [kind, input] of sources) {
          const pv = await processor.imageProcessor.preprocess(input);
          assert.deepEqual(pv.shape, want.shape);
          assert.equal(pv.dtype, 'float32');
          const diff = maxAbsDiff(await floats(pv), want.data as Float32Array);
          parity.push(`${name}/${kind} max|Δ| ${diff}`);
          assert.ok(diff <= 1e-5, `${name} from ${kind}: max |Δ| ${diff}`);
          pv.dispose();
        }
      });
    }

    it('the JPEG fixture decodes to exactly the pixels PIL decoded (rgb/shapes)', async () => {
      const decoded = await decodeImage(imagePath('shapes'));
      const want = rgbFixture('shapes');
      assert.equal(decoded.channels, 3);
      assert.deepEqual([decoded.width, decoded.height], [want.width, want.height]);
      assert.equal(maxAbsDiff(decoded.data, want.data), 0);
    });

    it('a batch of three differently sized images equals the three single results, row by row', async () => {
      const names = Object.keys(IMAGES) as ImageName[];
      const pv = await processor.imageProcessor.preprocess(names.map(imagePath));
      assert.deepEqual(pv.shape, [3, 3, 56, 56]);
      const all = await floats(pv);
      names.forEach((name, row) => {
        assert.ok(maxAbsDiff(rowOf(all, row, 3), expectedTensorsFile().get(`pixel_values/${name}`).data as Float32Array) <= 1e-5, name);
      });
      pv.dispose();
    });

    it('the rescale/normalize table reproduces float32(float64(v)*f) then (x-mean)/std in float32', () => {
      const lut = processor.imageProcessor.lut;
      // Every value of the 56x56 fixture outputs is one of the table's entries for its channel.
      for (const name of Object.keys(IMAGES) as ImageName[]) {
        const pv = expectedTensorsFile().get(`pixel_values/${name}`).data as Float32Array;
        for (let c = 0; c < 3; c++) {
          const entries = new Set(lut.subarray(c * 256, (c + 1) * 256));
          for (let i = c * 56 * 56; i < (c + 1) * 56 * 56; i++) assert.ok(entries.has(pv[i]), `${name} channel ${c} value ${pv[i]}`);
        }
      }
      const plain = pixelLut({ doRescale: false, rescaleFactor: 1, doNormalize: false, mean: [0, 0, 0], std: [1, 1, 1] });
      assert.equal(plain[255], 255);
      assert.equal(plain[256 + 7], 7);
    });

    it('float16, bfloat16 and float64 are the float32 values cast', async () => {
      const ref = await processor.imageProcessor.preprocess(imagePath('noise'));
      const f32 = await floats(ref);
      for (const dtype of ['float16', 'bfloat16', 'float64'] as const) {
        const pv = await processor.imageProcessor.preprocess(imagePath('noise'), { dtype });
        assert.equal(pv.dtype, dtype);
        const cast = await ref.to({ dtype });
        assert.deepEqual(Array.from((await pv.toArray()) as ArrayLike<number>), Array.from((await cast.toArray()) as ArrayLike<number>));
        if (dtype === 'float64') assert.ok(maxAbsDiff((await pv.toArray()) as Float64Array, f32) === 0);
        pv.dispose();
        cast.dispose();
      }
      ref.dispose();
    });

    it('raw pixels: grey, grey+alpha and RGBA convert like PIL convert("RGB") before resizing (alpha dropped, not composited)', async () => {
      const rgb = rgbFixture('noise');
      const n = rgb.width * rgb.height;
      const rgba = new Uint8Array(n * 4);
      const grey = new Uint8Array(n);
      const la = new Uint8Array(n * 2);
      const greyRgb = new Uint8Array(n * 3);
      for (let i = 0; i < n; i++) {
        rgba.set(rgb.data.subarray(i * 3, i * 3 + 3), i * 4);
        rgba[i * 4 + 3] = (i * 37) % 256; // alpha must not matter
        grey[i] = rgb.data[i * 3 + 1];
        la[i * 2] = grey[i];
        la[i * 2 + 1] = (i * 11) % 256;
        greyRgb.fill(grey[i], i * 3, i * 3 + 3);
      }
      const ip = processor.imageProcessor;
      const [fromRgb, fromRgba, fromGrey, fromLa, fromGreyRgb] = await Promise.all([
        ip.preprocess(rgb),
        ip.preprocess({ data: rgba, width: rgb.width, height: rgb.height, channels: 4 }),
        ip.preprocess({ data: grey, width: rgb.width, height: rgb.height, channels: 1 }),
        ip.preprocess({ data: la, width: rgb.width, height: rgb.height, channels: 2 }),
        ip.preprocess({ data: greyRgb, width: rgb.width, height: rgb.height, channels: 3 }),
      ]);
      assert.equal(maxAbsDiff(await floats(fromRgba), await floats(fromRgb)), 0);
      assert.equal(maxAbsDiff(await floats(fromGrey), await floats(fromGreyRgb)), 0);
      assert.equal(maxAbsDiff(await floats(fromLa), await floats(fromGreyRgb)), 0);
      for (const t of [fromRgb, fromRgba, fromGrey, fromLa, fromGreyRgb]) t.dispose();
    });

    it('do_resize=false keeps the size (a batch must then share it, as transformers needs to stack it)', async () => {
      const ip = new BlipImageProcessor({ do_resize: false });
      const pv = await ip.preprocess(rgbFixture('gradient'));
      assert.deepEqual(pv.shape, [1, 3, 48, 64]);
      pv.dispose();
      await assert.rejects(ip.preprocess([rgbFixture('gradient'), rgbFixture('noise')]),
        (e: unknown) => e instanceof InvalidArgumentError && e.index === 1 && /same size/.test(e.message));
    });

    it('makes the pixel values on CUDA when there is one', async function () {
      if (!cudaAvailable()) this.skip();
      const pv = await processor.imageProcessor.preprocess(imagePath('noise'), { device: 'cuda' });
      assert.equal(pv.device, 'cuda:0');
      assert.ok(maxAbsDiff(await floats(pv), expectedTensorsFile().get('pixel_values/noise').data as Float32Array) <= 1e-5);
      pv.dispose();
    });
  });

  describe('colour conversion and containers equal Pillow 9.4 (test/fixtures/processor)', () => {
    const index = JSON.parse(fs.readFileSync(path.join(PROCESSOR_DIR, 'index.json'), 'utf8')) as {
      pixel_values: { size: { width: number; height: number } };
      images: Record<string, { file: string; rgb?: string; size: [number, number]; description: string; pil_mode: string;
        pixel_values?: { file: string; shape: number[] }; oriented?: { size: [number, number]; rgb: string } }>;
    };
    const pvProcessor = new BlipImageProcessor({
      size: { height: index.pixel_values.size.height, width: index.pixel_values.size.width }, resample: 3,
      rescale_factor: 0.00392156862745098,
    });
    const rgbProcessor = new BlipImageProcessor({ do_resize: false, do_rescale: false, do_normalize: false });
    // What libvips (sharp) cannot read at all; everything else must match PIL exactly.
    const UNSUPPORTED = new Set(['bmp']);

    for (const [name, entry] of Object.entries(index.images)) {
      if (UNSUPPORTED.has(name)) {
        it(`${name}: ${entry.description}`, async () => {
          await assert.rejects(decodeImage(path.join(PROCESSOR_DIR, entry.file)), ImageDecodeError);
        });
        continue;
      }
      it(`${name} (PIL mode ${entry.pil_mode}): ${entry.description}`, async () => {
        const file = path.join(PROCESSOR_DIR, entry.file);
        const want = fs.readFileSync(path.join(PROCESSOR_DIR, entry.rgb!));
        // The RGB image before resizing: decode + the native colour conversion, values unchanged.
        const identity = await rgbProcessor.preprocess(file);
        const [, , height, width] = identity.shape;
        assert.deepEqual([width, height], entry.size);
        const planes = await floats(identity);
        const rgb = new Uint8Array(width * height * 3);
        for (let i = 0; i < width * height; i++) for (let c = 0; c < 3; c++) rgb[i * 3 + c] = planes[c * width * height + i];
        assert.equal(maxAbsDiff(rgb, want), 0, `${name}: RGB differs from PIL's convert("RGB")`);
        identity.dispose();
        // End to end: transformers' pixel values for this file (PIL resize to 16x20, rescale, normalize).
        const pv = await pvProcessor.preprocess(file);
        const wantPv = fs.readFileSync(path.join(PROCESSOR_DIR, entry.pixel_values!.file));
        const diff = maxAbsDiff(await floats(pv), new Float32Array(wantPv.buffer, wantPv.byteOffset, wantPv.length / 4));
        assert.ok(diff <= 1e-6, `${name}: pixel values max |Δ| ${diff}`);
        pv.dispose();
      });
    }

    it('EXIF orientation is ignored by default and applied with autoOrient (as ImageOps.exif_transpose)', async () => {
      const entry = index.images.jpeg_exif_orient6;
      const file = path.join(PROCESSOR_DIR, entry.file);
      const plain = await decodeImage(file);
      assert.deepEqual([plain.width, plain.height], entry.size);
      const oriented = await decodeImage(file, { autoOrient: true });
      assert.deepEqual([oriented.width, oriented.height], entry.oriented!.size);
      assert.equal(maxAbsDiff(oriented.data, fs.readFileSync(path.join(PROCESSOR_DIR, entry.oriented!.rgb))), 0);
      const out = await processor.process({ images: file, text: '', autoOrient: true });
      assert.deepEqual(out.pixelValues.shape, [1, 3, 56, 56]);
      for (const t of Object.values(out)) t.dispose();
    });
  });

  describe('token ids (transformers Blip2Processor)', () => {
    for (const [key, want] of Object.entries(expected().processor_outputs)) {
      it(`${key}: input_ids and attention_mask`, async () => {
        const [image] = key.split('/') as [ImageName];
        const out = await processor.process({ images: imagePath(image), text: want.text });
        assert.deepEqual(await rowsOf(out.inputIds), want.input_ids);
        assert.deepEqual(await rowsOf(out.attentionMask), want.attention_mask);
        assert.equal(out.inputIds.dtype, 'int64');
        assert.equal(out.attentionMask.dtype, 'int64');
        const diff = maxAbsDiff(await floats(out.pixelValues), expectedTensorsFile().get(`pixel_values/${image}`).data as Float32Array);
        assert.ok(diff <= 1e-5);
        for (const t of Object.values(out)) t.dispose();
      });
    }

    for (const side of ['left', 'right'] as const) {
      it(`batched as transformers intends (each row its own text), ${side} padding`, async () => {
        const batch = expected().batched_generations.find((b) => b.name === `batch/${side}/greedy`)!;
        const out = await processor.process({
          images: batch.images!.map((n) => imagePath(n as ImageName)), text: batch.texts, padding: true, paddingSide: side,
        });
        assert.deepEqual(await rowsOf(out.inputIds), batch.input_ids);
        assert.deepEqual(await rowsOf(out.attentionMask), batch.attention_mask);
        const all = await floats(out.pixelValues);
        batch.images!.forEach((n, row) => {
          assert.ok(maxAbsDiff(rowOf(all, row, 2), expectedTensorsFile().get(`pixel_values/${n}`).data as Float32Array) <= 1e-5);
        });
        // Not the 4.45.1 zip bug (one row for two images).
        const raw = expected().batched_generations.find((b) => b.name === `batch/${side}/processor_raw_output`)!;
        assert.equal(raw.input_ids.length, 1);
        assert.equal(out.inputIds.shape[0], 2);
        for (const t of Object.values(out)) t.dispose();
      });
    }

    it('the tokenizer gives the slow GPT2Tokenizer ids for the checked strings', () => {
      const check = (expected().meta as unknown as { tokenizer_json_check: { slow_ids: Record<string, number[]> } }).tokenizer_json_check;
      for (const [text, ids] of Object.entries(check.slow_ids)) assert.deepEqual(processor.tokenizer.encode(text), ids, JSON.stringify(text));
    });

    it('legacy path (no num_query_tokens): no image tokens', async () => {
      const legacy = new Blip2Processor(processor.imageProcessor, processor.tokenizer, { numQueryTokens: null });
      for (const g of expected().legacy_path.filter((x) => x.prompt !== null)) {
        const out = await legacy.process({ images: imagePath(g.image as ImageName), text: expected().meta.prompts[g.prompt] });
        assert.deepEqual(await rowsOf(out.inputIds), g.input_ids);
        assert.deepEqual(await rowsOf(out.attentionMask), g.attention_mask);
        for (const t of Object.values(out)) t.dispose();
      }
    });

    it('a single string with several images applies to every image; text alone has no image tokens; images alone no ids', async () => {
      const both = await processor.process({ images: [imagePath('gradient'), imagePath('noise')], text: 'a photo of' });
      assert.deepEqual(await rowsOf(both.inputIds), [[380, 380, 380, 380, 380, 380, 2, 101, 330, 279], [380, 380, 380, 380, 380, 380, 2, 101, 330, 279]]);
      for (const t of Object.values(both)) t.dispose();
      const textOnly = await processor.process({ text: 'a photo of' });
      assert.deepEqual(await rowsOf(textOnly.inputIds), [[2, 101, 330, 279]]);
      assert.equal((textOnly as { pixelValues?: Tensor }).pixelValues, undefined);
      textOnly.inputIds.dispose();
      textOnly.attentionMask.dispose();
      const imagesOnly = await processor.process({ images: imagePath('noise') });
      assert.deepEqual(Object.keys(imagesOnly), ['pixelValues']);
      imagesOnly.pixelValues.dispose();
    });

    it('maxLength counts text tokens (special tokens in, image tokens out); truncation and max_length padding', async () => {
      const question = expected().meta.prompts.question; // [2, 284, 62, 334, 268, 333, 67, 298, 62]
      const img = imagePath('gradient');
      const cut = await processor.process({ images: img, text: question, truncation: true, maxLength: 4 });
      assert.deepEqual(await rowsOf(cut.inputIds), [[380, 380, 380, 380, 380, 380, 2, 284, 62, 334]]);
      // transformers: max_length without padding and without truncation truncates (longest_first).
      const implicit = await processor.process({ images: img, text: question, maxLength: 5 });
      assert.deepEqual(await rowsOf(implicit.inputIds), [[380, 380, 380, 380, 380, 380, 2, 284, 62, 334, 268]]);
      const padded = await processor.process({ images: [img, img], text: [question, 'a photo of'], padding: 'max_length', maxLength: 12 });
      assert.deepEqual(await rowsOf(padded.inputIds), [
        [380, 380, 380, 380, 380, 380, 1, 1, 1, 2, 284, 62, 334, 268, 333, 67, 298, 62],
        [380, 380, 380, 380, 380, 380, 1, 1, 1, 1, 1, 1, 1, 1, 2, 101, 330, 279],
      ]);
      assert.deepEqual((await rowsOf(padded.attentionMask))[1], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]);
      const multiple = await processor.process({ images: img, text: 'a photo of', padding: true, padToMultipleOf: 8, paddingSide: 'right' });
      assert.deepEqual(await rowsOf(multiple.inputIds), [[380, 380, 380, 380, 380, 380, 2, 101, 330, 279, 1, 1, 1, 1]]);
      const noSpecial = await processor.process({ images: img, text: 'a photo of', addSpecialTokens: false });
      assert.deepEqual(await rowsOf(noSpecial.inputIds), [[380, 380, 380, 380, 380, 380, 101, 330, 279]]);
      for (const out of [cut, implicit, padded, multiple, noSpecial]) for (const t of Object.values(out)) t.dispose();
      await assert.rejects(processor.process({ images: [img, img], text: [question, 'a photo of'] }), (e: unknown) => e instanceof InvalidArgumentError && /padding/.test(e.message));
    });

    it('truncation keeps a trailing special token (T5-style post-processor) and respects truncation_side', () => {
      const json = JSON.parse(fs.readFileSync(path.join(TINY_OPT_CHECKPOINT, 'tokenizer.json'), 'utf8'));
      json.post_processor = {
        type: 'TemplateProcessing',
        single: [{ Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: '</s>', type_id: 0 } }],
        pair: [{ Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: '</s>', type_id: 0 } }, { Sequence: { id: 'B', type_id: 1 } }],
        special_tokens: { '</s>': { id: '</s>', ids: [2], tokens: ['</s>'] } },
      };
      const t5like = new PreTrainedTokenizer(json, { eos_token: '</s>', pad_token: '<pad>' });
      assert.deepEqual(t5like.encode('a photo of'), [101, 330, 279, 2]);
      assert.deepEqual(t5like.call('Question: what is this? Answer:', { truncation: true, maxLength: 4 }).inputIds, [[284, 62, 334, 2]]);
      const left = new PreTrainedTokenizer(json, { eos_token: '</s>', truncation_side: 'left' });
      assert.deepEqual(left.call('Question: what is this? Answer:', { truncation: true, maxLength: 4 }).inputIds, [[67, 298, 62, 2]]);
      assert.throws(() => t5like.call('a photo of', { truncation: true, maxLength: 0 }), InvalidArgumentError);
      const noPad = new PreTrainedTokenizer(json, {});
      assert.throws(() => noPad.call(['a', 'a photo of'], { padding: true }), (e: unknown) => e instanceof InvalidArgumentError && /padding token/.test(e.message));
    });
  });

  describe('decode / batchDecode (fixture generations, skip_special_tokens)', () => {
    it('decode equals `decoded` and `decoded_raw` of every fixture generation', async () => {
      for (const g of expected().generations as unknown as Array<{ name: string; sequences: number[][]; decoded: string[]; decoded_raw: string[] }>) {
        assert.equal(processor.decode(g.sequences[0], { skipSpecialTokens: true }), g.decoded[0], g.name);
        assert.equal(processor.decode(g.sequences[0]), g.decoded_raw[0], g.name);
        assert.equal(processor.decode(g.sequences[0].map(BigInt), { skipSpecialTokens: true }), g.decoded[0], g.name);
      }
    });

    it('batchDecode of arrays and of an int64 tensor equals the batched generations', async () => {
      for (const b of expected().batched_generations.filter((x) => x.sequences)) {
        assert.deepEqual(processor.batchDecode(b.sequences!, { skipSpecialTokens: true }), b.decoded);
        const t = Tensor.from(b.sequences!, undefined, { dtype: 'int64' });
        assert.deepEqual(await processor.batchDecode(t, { skipSpecialTokens: true }), b.decoded);
        const row = Tensor.from(b.sequences![1], undefined, { dtype: 'int64' });
        assert.equal(await processor.decode(row, { skipSpecialTokens: true }), b.decoded![1]);
        t.dispose();
        row.dispose();
      }
    });

    it('skips ids past the tokenizer (padded LM vocabulary rows), special tokens and <image>; cleans up spaces on request', () => {
      assert.equal(processor.decode([2, 101, 385, 391, 330]), '</s>a photo');
      assert.equal(processor.decode([380, 380, 2, 101, 330, 279], { skipSpecialTokens: true }), 'a photo of');
      assert.equal(processor.decode([]), '');
      const spaced = processor.tokenizer.encode('a photo , of .', { addSpecialTokens: false });
      assert.equal(processor.decode(spaced), 'a photo , of .'); // tokenizer_config: clean_up_tokenization_spaces false
      assert.equal(processor.decode(spaced, { cleanUpTokenizationSpaces: true }), 'a photo, of.');
      assert.throws(() => processor.decode([1.5]), InvalidArgumentError);
    });
  });

  describe('bad input: typed errors naming the input index and the reason', () => {
    const good = (): Buffer => fs.readFileSync(imagePath('gradient'));
    async function rejectsAt(images: ImageInput[], index: number, type: typeof ImageDecodeError | typeof InvalidArgumentError, reason: RegExp, extra: Record<string, unknown> = {}) {
      await assert.rejects(processor.process({ images, text: '', ...extra }), (e: unknown) => {
        assert.ok(e instanceof type, `expected ${type.name}, got ${String(e)}`);
        assert.equal((e as { index?: number }).index, index, (e as Error).message);
        assert.match((e as Error).message, new RegExp(`index ${index}|images\\[${index}\\]`));
        assert.match((e as Error).message, reason);
        return true;
      });
    }

    it('an empty buffer', () => rejectsAt([good(), Buffer.alloc(0)], 1, ImageDecodeError, /empty/));
    it('random bytes', () => {
      const random = Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 2654435761) >>> 24));
      return rejectsAt([good(), good(), random], 2, ImageDecodeError, /not a supported image format/);
    });
    it('a truncated JPEG', () => {
      const jpeg = fs.readFileSync(imagePath('shapes'));
      return rejectsAt([jpeg.subarray(0, Math.floor(jpeg.length * 0.6))], 0, ImageDecodeError, /premature end|truncat|decoded/i);
    });
    it('a PNG with a corrupt chunk (IDAT data changed, CRC no longer matches)', () => {
      const png = Buffer.from(good());
      const idat = png.indexOf('IDAT');
      png[idat + 20] ^= 0xff;
      return rejectsAt([good(), png], 1, ImageDecodeError, /decoded|crc|read error/i);
    });
    /** A PNG whose header says width x height, with a token (invalid) image body. */
    function pngWithHeader(width: number, height: number): Buffer {
      const ihdr = Buffer.alloc(13);
      ihdr.writeUInt32BE(width, 0);
      ihdr.writeUInt32BE(height, 4);
      ihdr[8] = 8; // bit depth
      ihdr[9] = 2; // RGB
      const chunk = (type: string, data: Buffer): Buffer => {
        const body = Buffer.concat([Buffer.from(type, 'latin1'), data]);
        const crc = Buffer.alloc(4);
        crc.writeUInt32BE(zlib.crc32(body));
        const len = Buffer.alloc(4);
        len.writeUInt32BE(data.length);
        return Buffer.concat([len, body, crc]);
      };
      return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk('IHDR', ihdr),
        chunk('IDAT', zlib.deflateSync(Buffer.alloc(16))), chunk('IEND', Buffer.alloc(0))]);
    }
    it('a 0xN image (raw pixels, and a PNG whose header says width 0)', async () => {
      await rejectsAt([good(), { data: new Uint8Array(0), width: 0, height: 5, channels: 3 }], 1, ImageDecodeError, /0x5/);
      await rejectsAt([pngWithHeader(0, 5)], 0, ImageDecodeError, /./);
    });
    it('an image above the pixel limit (default 100 MP; configurable)', async () => {
      // A PNG header claiming 20000x6000 (120 MP): rejected from the header, nothing is decoded.
      await rejectsAt([good(), pngWithHeader(20000, 6000)], 1, ImageDecodeError, /120000000 pixels.*above the limit of 100000000/);
      await rejectsAt([good(), good()], 0, ImageDecodeError, /3072 pixels.*above the limit of 1000/, { maxPixels: 1000 });
      await rejectsAt([rgbFixture('noise')], 0, ImageDecodeError, /above the limit of 100/, { maxPixels: 100 });
    });
    it('text that is not a string', async () => {
      await assert.rejects(processor.process({ images: [good(), good()], text: ['ok', 42 as never] }),
        (e: unknown) => e instanceof InvalidArgumentError && e.index === 1 && /text\[1\]/.test(e.message) && /expected a string/.test(e.message));
      await assert.rejects(processor.process({ images: good(), text: 42 as never }), (e: unknown) => e instanceof InvalidArgumentError && /'text'/.test(e.message));
    });
    it('more texts than images (and fewer, beyond a single string)', async () => {
      await assert.rejects(processor.process({ images: [good()], text: ['a', 'b'] }),
        (e: unknown) => e instanceof InvalidArgumentError && e.index === 1 && /more texts \(2\) than images \(1\)/.test(e.message));
      await assert.rejects(processor.process({ images: [good(), good(), good()], text: ['a', 'b'] }),
        (e: unknown) => e instanceof InvalidArgumentError && e.index === 2 && /fewer texts/.test(e.message));
    });
    it('wrong kinds of values: not an image, bad raw pixels, missing file, bad options', async () => {
      await rejectsAt([good(), 42 as never], 1, InvalidArgumentError, /images\[1\]/);
      await rejectsAt([{ data: new Uint8Array(10), width: 2, height: 2, channels: 3 }], 0, ImageDecodeError, /10 bytes/);
      await rejectsAt([{ data: new Uint8Array(20), width: 2, height: 2, channels: 5 as never }], 0, InvalidArgumentError, /channels/);
      await rejectsAt([{ data: [1, 2, 3] as never, width: 1, height: 1, channels: 3 }], 0, InvalidArgumentError, /Uint8Array/);
      await rejectsAt([good(), path.join(os.tmpdir(), 'no-such-image.png')], 1, ImageDecodeError, /ENOENT/);
      await assert.rejects(processor.process({ images: [], text: '' }), InvalidArgumentError);
      await assert.rejects(processor.process({}), InvalidArgumentError);
      await assert.rejects(processor.process({ images: good(), dtype: 'int64' as never }), InvalidArgumentError);
      await assert.rejects(processor.process({ images: good(), device: 'tpu:0' }), DeviceError);
      await assert.rejects(processor.process({ images: good(), maxPixels: 0 }), InvalidArgumentError);
      await assert.rejects(processor.process({ images: good(), signal: 'x' as never }), InvalidArgumentError);
    });
    it('the native step validates on its own too (sizes, lengths, channels, filter, LUT, dtype), naming the index', async () => {
      const lut = processor.imageProcessor.lut;
      const img = { data: new Uint8Array(12), width: 2, height: 2, channels: 3 as const };
      const resize = { width: 4, height: 4, filter: 3 };
      const bad = async (images: unknown[], options: Record<string, unknown>, type: new (...a: never[]) => Error, match: RegExp, index?: number) => {
        // Validation errors are thrown synchronously by the binding (lib's async callers turn them into rejections).
        await assert.rejects(async () => binding.preprocessImages(images as never, { resize, lut, ...options } as never), (e: unknown) => {
          assert.ok(e instanceof type, String(e));
          assert.match((e as Error).message, match);
          if (index !== undefined) assert.equal((e as { index?: number }).index, index);
          return true;
        });
      };
      await bad([img, { ...img, width: 0 }], {}, ImageDecodeError, /index 1 is 0x2/, 1);
      await bad([img, { ...img, data: new Uint8Array(11) }], {}, ImageDecodeError, /11 bytes/, 1);
      await bad([img, { ...img, channels: 6 }], {}, InvalidArgumentError, /channels/, 1);
      await bad([img, { ...img, width: 1.5 }], {}, InvalidArgumentError, /width/, 1);
      await bad([img, { ...img, data: new Float32Array(12) }], {}, InvalidArgumentError, /Uint8Array/, 1);
      await bad([img, img, { ...img, width: 5000, height: 5000, data: new Uint8Array(3) }], { maxPixels: 1e6 }, ImageDecodeError, /above the limit/, 2);
      await bad([img, { ...img, cmyk: true }], {}, InvalidArgumentError, /CMYK needs 4/, 1);
      await bad([img, { ...img, channels: 4, data: new Uint8Array(16), transparentColour: [1, 2] }], {}, InvalidArgumentError, /transparentColour/, 1);
      await bad([img, { ...img, channels: 4, data: new Uint8Array(16), transparentColour: [1, 2, 300] }], {}, InvalidArgumentError, /transparentColour/, 1);
      await bad([img], { resize: { width: 4, height: 4, filter: 9 } }, InvalidArgumentError, /filter/);
      await bad([img], { resize: { width: 0, height: 4, filter: 3 } }, InvalidArgumentError, /resize\.width/);
      await bad([img], { lut: new Float32Array(10) }, InvalidArgumentError, /lut/);
      await bad([img], { dtype: 'int32' }, DTypeError, /floating/);
      await bad([], {}, InvalidArgumentError, /at least one image/);
      await bad([img, { ...img, width: 3, data: new Uint8Array(18) }], { resize: null }, InvalidArgumentError, /same size/, 1);
    });
  });

  describe('abort, concurrency, memory', () => {
    it('an aborted signal rejects with AbortError (before, and while decoding) and leaks no tensor', async () => {
      const before = liveTensorCount();
      const aborted = AbortSignal.abort();
      await assert.rejects(processor.process({ images: imagePath('shapes'), text: '', signal: aborted }), AbortError);
      for (let i = 0; i < 20; i++) {
        const controller = new AbortController();
        const pending = processor.process({ images: [imagePath('shapes'), imagePath('noise')], text: '', signal: controller.signal });
        setImmediate(() => controller.abort());
        await pending.then((out) => { for (const t of Object.values(out)) t.dispose(); }, (e: unknown) => assert.ok(e instanceof AbortError, String(e)));
      }
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(liveTensorCount(), before);
    });

    it('many concurrent calls give the same pixel values as one', async () => {
      const want = expectedTensorsFile().get('pixel_values/shapes').data as Float32Array;
      const outs = await Promise.all(Array.from({ length: 24 }, () => processor.imageProcessor.preprocess(fs.readFileSync(imagePath('shapes')))));
      for (const pv of outs) {
        assert.ok(maxAbsDiff(await floats(pv), want) <= 1e-5);
        pv.dispose();
      }
    });
  });
});

describe('Blip2Processor fuzz: 2,000 mutated image buffers', function () {
  this.timeout(600_000);

  it('every call resolves with valid pixel values or rejects with a typed error; the process survives', async () => {
    const sources = [
      ...Object.values(IMAGES).map((f) => path.join(FIXTURES_DIR, 'images', f)),
      ...fs.readdirSync(PROCESSOR_DIR).filter((f) => /\.(png|jpg|gif|webp|tif)$/.test(f)).map((f) => path.join(PROCESSOR_DIR, f)),
    ].map((f) => fs.readFileSync(f));
    let seed = 0x5eed1234;
    const rand = (): number => {
      // mulberry32
      seed = (seed + 0x6d2b79f5) | 0;
      let t = seed;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
    const pick = <T>(list: readonly T[]): T => list[Math.floor(rand() * list.length)];
    const mutate = (): { bytes: Buffer; kind: string } => {
      const a = pick(sources);
      const kind = pick(['flip', 'flip-header', 'truncate', 'splice', 'overwrite', 'flip+truncate'] as const);
      let out = Buffer.from(a);
      const flip = (headerOnly: boolean) => {
        const n = 1 + Math.floor(rand() * 8);
        for (let i = 0; i < n; i++) {
          const at = Math.floor(rand() * (headerOnly ? Math.min(out.length, 64) : out.length));
          out[at] ^= 1 << Math.floor(rand() * 8);
        }
      };
      switch (kind) {
        case 'flip': flip(false); break;
        case 'flip-header': flip(true); break;
        case 'truncate': out = out.subarray(0, Math.floor(rand() * out.length)); break;
        case 'splice': {
          const b = pick(sources);
          out = Buffer.concat([a.subarray(0, Math.floor(rand() * a.length)), b.subarray(Math.floor(rand() * b.length))]);
          break;
        }
        case 'overwrite': {
          const at = Math.floor(rand() * out.length);
          const len = Math.min(out.length - at, 1 + Math.floor(rand() * 32));
          for (let i = 0; i < len; i++) out[at + i] = Math.floor(rand() * 256);
          break;
        }
        case 'flip+truncate': flip(false); out = out.subarray(0, Math.floor(rand() * out.length)); break;
      }
      return { bytes: out, kind };
    };

    const ip = new BlipImageProcessor({ size: { height: 16, width: 16 } });
    const lutMin = Math.min(...ip.lut);
    const lutMax = Math.max(...ip.lut);
    const before = liveTensorCount();
    const counts = { resolved: 0, imageDecodeError: 0, invalidArgumentError: 0 };
    const TOTAL = 2000;
    const CONCURRENCY = 8;
    let done = 0;
    const worker = async () => {
      while (done < TOTAL) {
        const n = done++;
        const { bytes, kind } = mutate();
        // Every 10th call puts the mutated image second in a batch, to check the index.
        const withGood = n % 10 === 0;
        const images = withGood ? [sources[0], bytes] : [bytes];
        try {
          // maxPixels bounds the memory a mutated header can ask for; the default limit has its own test.
          const pv = await ip.preprocess(images, { maxPixels: 4_000_000 });
          assert.deepEqual(pv.shape, [images.length, 3, 16, 16]);
          const values = await floats(pv);
          for (const v of values) assert.ok(v >= lutMin && v <= lutMax, `value ${v} outside the table`);
          pv.dispose();
          counts.resolved++;
        } catch (error) {
          if (error instanceof ImageDecodeError) counts.imageDecodeError++;
          else if (error instanceof InvalidArgumentError) counts.invalidArgumentError++;
          else assert.fail(`call ${n} (${kind}) rejected with an untyped error: ${String(error)}`);
          assert.equal((error as { index?: number }).index, withGood ? 1 : 0, `call ${n} (${kind}): ${(error as Error).message}`);
        }
      }
    };
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    console.log(`      fuzz: ${JSON.stringify(counts)}`);
    assert.equal(counts.resolved + counts.imageDecodeError + counts.invalidArgumentError, TOTAL);
    assert.ok(counts.resolved > 0 && counts.imageDecodeError > 0);
    assert.equal(liveTensorCount(), before);
  });
});
