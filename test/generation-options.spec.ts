import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import {
  AbortError,
  Blip2ForConditionalGeneration,
  DTypeError,
  DisposedError,
  InvalidArgumentError,
  ModelLoadError,
  ShapeError,
  Tensor,
  liveTensorCount,
} from '../lib';
import { expected, fixtureFloats, fixtureTensor, ids, rowsOf } from './support/fixtures';
import { readModelFolder } from '../lib/models/model-folder';
import { ScriptModule } from '../lib/runtime/script-module';
import { settleFinalizers } from './support/gc';
import { referenceGreedy } from './support/reference';
import { tinyOptModel } from './support/python';

const QUESTION = expected().processor_outputs['gradient/question'].input_ids[0];
const EMPTY = expected().processor_outputs['gradient/empty'].input_ids[0];

describe('generate: options, stopping, sampling, streaming, errors', () => {
  let model: Blip2ForConditionalGeneration;
  let pixels: Tensor;
  before(async () => {
    model = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel());
    pixels = fixtureTensor('pixel_values/gradient');
  });
  after(() => model.dispose());

  describe('agrees with a forward()-only reference decoder', () => {
    it('greedy, 20 tokens', async () => {
      const ref = await referenceGreedy(model, pixels, QUESTION, 20);
      const [row] = await rowsOf(await model.generate({ pixelValues: pixels, inputIds: ids([QUESTION]) }, { maxNewTokens: 20 }));
      assert.deepEqual(row.slice(QUESTION.length), ref);
    });

    it('repetition penalty (prompt ids, image placeholders and generated ids all penalised)', async () => {
      const ref = await referenceGreedy(model, pixels, QUESTION, 16, { repetitionPenalty: 1.8 });
      const plain = await referenceGreedy(model, pixels, QUESTION, 16);
      assert.notDeepEqual(ref, plain, 'the penalty should change this output');
      const [row] = await rowsOf(await model.generate({ pixelValues: pixels, inputIds: ids([QUESTION]) }, { maxNewTokens: 16, repetitionPenalty: 1.8 }));
      assert.deepEqual(row.slice(QUESTION.length), ref);
    });

    it('stops at an end-of-sequence token; finished rows are padded while others go on', async () => {
      const plain = await referenceGreedy(model, pixels, EMPTY, 12);
      const eos = plain[2];
      const out = await model.generate({ pixelValues: pixels, inputIds: ids([EMPTY]) }, { maxNewTokens: 12, eosTokenId: eos, padTokenId: 1 });
      const [row] = await rowsOf(out);
      assert.deepEqual(row.slice(EMPTY.length), plain.slice(0, plain.indexOf(eos) + 1));

      // Two images: the gradient row stops early, the noise row runs to the end (or its own stop).
      const both = Tensor.from(Float32Array.from([...fixtureFloats('pixel_values/gradient'), ...fixtureFloats('pixel_values/noise')]), [2, 3, 56, 56]);
      const noiseRef = await referenceGreedy(model, fixtureTensor('pixel_values/noise'), EMPTY, 12, { eos: [eos] });
      const rows = await rowsOf(await model.generate({ pixelValues: both, inputIds: ids([EMPTY, EMPTY]) }, { maxNewTokens: 12, eosTokenId: [eos, 9999 % 392], padTokenId: 1 }));
      const width = Math.max(plain.indexOf(eos) + 1, noiseRef.length);
      assert.equal(rows[0].length, EMPTY.length + width);
      const gradientNew = rows[0].slice(EMPTY.length);
      assert.deepEqual(gradientNew, [...plain.slice(0, plain.indexOf(eos) + 1), ...Array(width - plain.indexOf(eos) - 1).fill(1)]);
      assert.deepEqual(rows[1].slice(EMPTY.length, EMPTY.length + noiseRef.length), noiseRef);
    });

    it('minNewTokens holds the end-of-sequence token back', async () => {
      const plain = await referenceGreedy(model, pixels, EMPTY, 12);
      const eos = plain[1];
      const [row] = await rowsOf(await model.generate({ pixelValues: pixels, inputIds: ids([EMPTY]) }, { maxNewTokens: 6, minNewTokens: 6, eosTokenId: eos }));
      const generated = row.slice(EMPTY.length);
      assert.equal(generated.length, 6);
      assert.ok(!generated.slice(0, 5).includes(eos) || generated.indexOf(eos) >= 5, `eos too early in ${generated}`);
      assert.equal(generated[0], plain[0]);
      assert.notEqual(generated[1], eos);
    });
  });

  describe('sampling', () => {
    it('is reproducible with a seed and varies with it', async () => {
      const run = async (seed: number) => (await rowsOf(await model.generate({ pixelValues: pixels }, { maxNewTokens: 16, doSample: true, seed, topK: 0 })))[0];
      const a = await run(7);
      assert.deepEqual(await run(7), a);
      const others = await Promise.all([8, 9, 10].map(run));
      assert.ok(others.some((o) => JSON.stringify(o) !== JSON.stringify(a)), 'different seeds should give different samples');
    });

    it('topK 1, or a tiny topP, is greedy', async () => {
      const [greedy] = await rowsOf(await model.generate({ pixelValues: pixels }, { maxNewTokens: 10 }));
      const [k1] = await rowsOf(await model.generate({ pixelValues: pixels }, { maxNewTokens: 10, doSample: true, topK: 1, seed: 3 }));
      const [p0] = await rowsOf(await model.generate({ pixelValues: pixels }, { maxNewTokens: 10, doSample: true, topK: 0, topP: 1e-6, seed: 3 }));
      assert.deepEqual(k1, greedy);
      assert.deepEqual(p0, greedy);
    });

    it('numReturnSequences gives that many rows per prompt, each with the prompt first', async () => {
      const both = Tensor.from(Float32Array.from([...fixtureFloats('pixel_values/gradient'), ...fixtureFloats('pixel_values/noise')]), [2, 3, 56, 56]);
      const out = await model.generate({ pixelValues: both, inputIds: ids([QUESTION, QUESTION]) }, { maxNewTokens: 5, doSample: true, numReturnSequences: 3, seed: 1, temperature: 1.5 });
      assert.deepEqual(out.shape, [6, QUESTION.length + 5]);
      for (const row of await rowsOf(out)) assert.deepEqual(row.slice(0, QUESTION.length), QUESTION);
    });
  });

  describe('beam search', () => {
    it('numReturnSequences returns the best hypotheses in order of score', async () => {
      const out = await model.generate({ pixelValues: pixels }, { maxNewTokens: 8, numBeams: 4, numReturnSequences: 3, returnDictInGenerate: true });
      assert.deepEqual(out.sequences.shape, [3, 7 + 8]);
      const scores = await out.sequencesScores!.toList();
      assert.ok(scores[0] >= scores[1] && scores[1] >= scores[2], `scores ${scores}`);
      const [best] = await rowsOf(out.sequences);
      const [alone] = await rowsOf(await model.generate({ pixelValues: pixels }, { maxNewTokens: 8, numBeams: 4 }));
      assert.deepEqual(best, alone);
    });
  });

  describe('streaming, abort, concurrency', () => {
    it('onStep reports every step\'s tokens, which add up to the result', async () => {
      const seen: number[] = [];
      const steps: number[] = [];
      const out = await model.generate({ pixelValues: pixels }, { maxNewTokens: 9, onStep: (e) => { steps.push(e.step); seen.push(...e.tokens); } });
      const [row] = await rowsOf(out);
      assert.deepEqual(steps, [0, 1, 2, 3, 4, 5, 6, 7, 8]);
      assert.deepEqual(seen, row.slice(7));
    });

    it('an error thrown by onStep stops the generation and is what generate rejects with', async () => {
      const boom = new Error('stop here');
      await assert.rejects(model.generate({ pixelValues: pixels }, { maxNewTokens: 50, onStep: () => { throw boom; } }), (e) => e === boom);
    });

    it('an AbortSignal stops a running generation between steps', async () => {
      const controller = new AbortController();
      let steps = 0;
      const running = model.generate({ pixelValues: pixels }, {
        maxNewTokens: 100,
        onStep: () => {
          if (++steps === 3) controller.abort();
        },
        signal: controller.signal,
      });
      await assert.rejects(running, AbortError);
      assert.ok(steps < 10, `${steps} steps ran`);
      const [row] = await rowsOf(await model.generate({ pixelValues: pixels }, { maxNewTokens: 3 }));
      assert.equal(row.length, 10, 'the model keeps working after an abort');
    });

    it('concurrent calls give the same results as one by one, and leak no tensors', async () => {
      await settleFinalizers();
      const before = liveTensorCount();
      const images = ['gradient', 'noise', 'shapes'];
      const alone: number[][] = [];
      for (const image of images) {
        const out = await model.generate({ pixelValues: fixtureTensor(`pixel_values/${image}`), inputIds: ids([QUESTION]) }, { maxNewTokens: 10 });
        alone.push((await rowsOf(out))[0]);
      }
      const together = await Promise.all(Array.from({ length: 12 }, async (_, i) => {
        const pv = fixtureTensor(`pixel_values/${images[i % 3]}`);
        const input = ids([QUESTION]);
        const out = await model.generate({ pixelValues: pv, inputIds: input }, { maxNewTokens: 10 });
        const rows = await rowsOf(out);
        pv.dispose();
        input.dispose();
        out.dispose();
        return rows[0];
      }));
      together.forEach((row, i) => assert.deepEqual(row, alone[i % 3]));
      await settleFinalizers();
      assert.ok(liveTensorCount() <= before + 3 * 3, `live tensors ${liveTensorCount()} vs ${before} before`);
    });
  });

  describe('bad options and inputs are typed errors naming the option, value and range', () => {
    const cases: Array<[string, Record<string, unknown>, string, RegExp]> = [
      ['maxNewTokens 0', { maxNewTokens: 0 }, 'maxNewTokens', /is 0; expected an integer >= 1/],
      ['maxNewTokens -3', { maxNewTokens: -3 }, 'maxNewTokens', /expected an integer >= 1/],
      ['maxNewTokens 2.5', { maxNewTokens: 2.5 }, 'maxNewTokens', /is 2.5; expected an integer >= 1/],
      ['maxNewTokens "8"', { maxNewTokens: '8' }, 'maxNewTokens', /is "8"/],
      ['numBeams 0', { numBeams: 0 }, 'numBeams', /is 0; expected an integer from 1 to 1024/],
      ['topP 0', { topP: 0 }, 'topP', /is 0; expected a number in \(0, 1\]/],
      ['topP 1.5', { topP: 1.5 }, 'topP', /expected a number in \(0, 1\]/],
      ['temperature 0 with sampling', { doSample: true, temperature: 0 }, 'temperature', /expected a number > 0 when sampling/],
      ['temperature -1 with sampling', { doSample: true, temperature: -1 }, 'temperature', /> 0 when sampling/],
      ['repetitionPenalty 0', { repetitionPenalty: 0 }, 'repetitionPenalty', /expected a number > 0/],
      ['minNewTokens -1', { minNewTokens: -1 }, 'minNewTokens', /expected an integer >= 0/],
      ['numReturnSequences > numBeams', { numBeams: 2, numReturnSequences: 3 }, 'numReturnSequences', /at most numBeams \(2\)/],
      ['numReturnSequences with greedy', { numReturnSequences: 2 }, 'numReturnSequences', /1 for greedy search/],
      ['earlyStopping "sometimes"', { earlyStopping: 'sometimes' }, 'earlyStopping', /true, false or 'never'/],
      ['eosTokenId out of vocabulary', { eosTokenId: 392 }, 'eosTokenId', /from 0 to 391/],
      ['an unknown option', { max_new_tokens: 5 }, 'options.max_new_tokens', /no such option/],
    ];
    for (const [title, options, argument, message] of cases) {
      it(title, async () => {
        await assert.rejects(model.generate({ pixelValues: pixels }, options as never), (e: unknown) => {
          assert.ok(e instanceof InvalidArgumentError, String(e));
          assert.equal(e.argument, argument);
          assert.match(e.message, message);
          return true;
        });
      });
    }

    it('prompt + maxNewTokens beyond the model\'s positions: the error names the prompt and its length', async () => {
      await assert.rejects(model.generate({ pixelValues: pixels, inputIds: ids([QUESTION]) }, { maxNewTokens: 120 }), (e: unknown) => {
        assert.ok(e instanceof InvalidArgumentError, String(e));
        assert.equal(e.argument, 'inputs.inputIds');
        assert.match(e.message, /the prompt of row 0 takes 15 positions \(6 image queries and 9 text tokens\); with maxNewTokens 120 that is more than the 128 positions a sequence may use/);
        assert.equal(e.expected, 'at most 8 positions with maxNewTokens 120');
        return true;
      });
      // The model still serves a correct request afterwards.
      const ok = await model.generate({ pixelValues: pixels, inputIds: ids([QUESTION]) }, { maxNewTokens: 4 });
      assert.deepEqual(ok.shape, [1, 19]);
    });

    it('batch sizes of pixelValues and inputIds that differ', async () => {
      await assert.rejects(model.generate({ pixelValues: pixels, inputIds: ids([EMPTY, EMPTY]) }), (e: unknown) => {
        assert.ok(e instanceof ShapeError, String(e));
        assert.equal(e.argument, 'inputs.inputIds');
        assert.match(e.message, /batch size 2 but 'inputs.pixelValues' has 1/);
        return true;
      });
    });

    it('wrong dtypes and shapes', async () => {
      await assert.rejects(model.generate({ pixelValues: pixels, inputIds: Tensor.from([EMPTY]) }), (e: unknown) => e instanceof DTypeError && e.argument === 'inputs.inputIds' && /float32; expected int64/.test(e.message));
      await assert.rejects(model.generate({ pixelValues: Tensor.from(new Uint8Array(3 * 56 * 56), [1, 3, 56, 56]) }), (e: unknown) => e instanceof DTypeError && e.argument === 'inputs.pixelValues');
      await assert.rejects(model.generate({ pixelValues: Tensor.from(new Float32Array(3 * 32 * 32), [1, 3, 32, 32]) }), (e: unknown) => e instanceof ShapeError && /expected \[B, 3, 56, 56\]/.test(e.message));
      await assert.rejects(model.generate({ pixelValues: pixels, inputIds: ids([EMPTY]), attentionMask: ids([[1, 1]]) }), (e: unknown) => e instanceof ShapeError && e.argument === 'inputs.attentionMask');
      await assert.rejects(model.generate({ pixelValues: pixels, inputIds: ids([[2, 500]]) }), (e: unknown) => e instanceof InvalidArgumentError && /id 500/.test(e.message));
      await assert.rejects(model.generate({ pixelValues: pixels, inputIds: ids([[380, 380, 2]]) }), (e: unknown) => e instanceof InvalidArgumentError && /2 image tokens/.test(e.message));
      await assert.rejects(model.generate({ pixelValues: 'pixels' as never }), (e: unknown) => e instanceof InvalidArgumentError && e.argument === 'inputs.pixelValues');
      await assert.rejects(model.generate(null as never), InvalidArgumentError);
      const gone = fixtureTensor('pixel_values/noise');
      gone.dispose();
      await assert.rejects(model.generate({ pixelValues: gone }), DisposedError);
    });
  });

  describe('model folders', () => {
    let broken: string;
    beforeEach(() => {
      broken = fs.mkdtempSync(path.join(os.tmpdir(), 'blip2-model-'));
      fs.cpSync(tinyOptModel(), broken, { recursive: true });
    });
    afterEach(() => fs.rmSync(broken, { recursive: true, force: true }));

    const rejectsNaming = async (file: string, message: RegExp) => {
      await assert.rejects(Blip2ForConditionalGeneration.fromPretrained(broken), (e: unknown) => {
        assert.ok(e instanceof ModelLoadError, String(e));
        assert.equal(e.file, path.join(broken, file));
        assert.match(e.message, message);
        return true;
      });
    };

    it('a missing module file', async () => {
      fs.rmSync(path.join(broken, 'language_model.pt'));
      await rejectsNaming('language_model.pt', /is missing/);
    });
    it('a truncated module file', async () => {
      const file = path.join(broken, 'image_encoder.pt');
      fs.truncateSync(file, 1000);
      await rejectsNaming('image_encoder.pt', /damaged: it has 1000 bytes/);
    });
    it('a module file changed in place (same size): TorchScript is code, so its sha256 must match', async () => {
      const file = path.join(broken, 'language_model.pt');
      const bytes = fs.readFileSync(file);
      bytes.fill(0x41, 0, 4096);
      fs.writeFileSync(file, bytes);
      await rejectsNaming('language_model.pt', /does not match the sha256 in the manifest/);
    });
    it('a module file that is no TorchScript archive (sha256 updated to match)', async () => {
      const file = path.join(broken, 'language_model.pt');
      const bytes = fs.readFileSync(file);
      bytes.fill(0x41, 0, 4096);
      fs.writeFileSync(file, bytes);
      const manifest = JSON.parse(fs.readFileSync(path.join(broken, 'manifest.json'), 'utf8'));
      manifest.modules.language_model.sha256 = createHash('sha256').update(bytes).digest('hex');
      fs.writeFileSync(path.join(broken, 'manifest.json'), JSON.stringify(manifest));
      await rejectsNaming('language_model.pt', /damaged or not a TorchScript archive/);
    });
    it('a truncated weights file', async () => {
      const file = path.join(broken, 'weights.safetensors');
      fs.truncateSync(file, 5000);
      await rejectsNaming('weights.safetensors', /damaged: it has 5000 bytes, the manifest says/);
    });
    it('a weights file whose header is damaged (same size)', async () => {
      const file = path.join(broken, 'weights.safetensors');
      const bytes = fs.readFileSync(file);
      bytes.writeBigUInt64LE(BigInt(bytes.length), 0);
      fs.writeFileSync(file, bytes);
      await rejectsNaming('weights.safetensors', /weights file .* is damaged: its header length field/);
      bytes.writeBigUInt64LE(100n, 0);
      fs.writeFileSync(file, bytes);
      await rejectsNaming('weights.safetensors', /weights file .* is damaged: its header is not JSON/);
    });
    it('a weights file with a tensor past its end', async () => {
      const file = path.join(broken, 'weights.safetensors');
      const bytes = fs.readFileSync(file);
      const n = Number(bytes.readBigUInt64LE(0));
      const header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8'));
      const key = Object.keys(header).find((k) => k !== '__metadata__') as string;
      const [begin, end] = header[key].data_offsets;
      header[key].data_offsets = [begin + bytes.length, end + bytes.length];
      const text = Buffer.from(JSON.stringify(header));
      const length = Buffer.alloc(8);
      length.writeBigUInt64LE(BigInt(text.length), 0);
      const rewritten = Buffer.concat([length, text, bytes.subarray(8 + n)]);
      fs.writeFileSync(file, rewritten);
      const manifest = JSON.parse(fs.readFileSync(path.join(broken, 'manifest.json'), 'utf8'));
      manifest.weights.files[0].bytes = rewritten.length;
      fs.writeFileSync(path.join(broken, 'manifest.json'), JSON.stringify(manifest));
      await rejectsNaming('weights.safetensors', new RegExp(`tensor '${key.replace(/\./g, '\\.')}' lies past the end`));
    });
    const editManifest = (edit: (m: Record<string, any>) => void) => {
      const file = path.join(broken, 'manifest.json');
      const manifest = JSON.parse(fs.readFileSync(file, 'utf8'));
      edit(manifest);
      fs.writeFileSync(file, JSON.stringify(manifest));
    };
    for (const [what, edit, field] of [
      ['no special_tokens', (m: Record<string, any>) => { delete m.special_tokens; }, /'special_tokens' is undefined; expected an object of token ids/],
      ['a bad dtype', (m: Record<string, any>) => { m.dtype = 'int8'; }, /'dtype' is "int8"; expected one of float32, float16, bfloat16/],
      ['a dtype the weights do not have', (m: Record<string, any>) => { m.dtype = 'bfloat16'; }, /'dtype' is "bfloat16"; the weights are float32/],
      ['a wrong num_layers', (m: Record<string, any>) => { m.language_model.num_layers = 3; }, /'language_model.num_layers' is 3; the weights have 2 decoder layers/],
      ['a wrong head_dim', (m: Record<string, any>) => { m.language_model.head_dim = 16; }, /'language_model.head_dim' is 16; num_heads x head_dim is 64 but the attention projections are 48 wide/],
      ['a wrong vocab_size', (m: Record<string, any>) => { m.vocab_size = 500; }, /'vocab_size' is 500; the LM head is \[392, 48\]/],
      ['a bos id outside the vocabulary', (m: Record<string, any>) => { m.special_tokens.bos_token_id = 9999; }, /'special_tokens.bos_token_id' is 9999; expected null or a token id below 392/],
    ] as const) {
      it(`a manifest with ${what} fails at load naming the field`, async () => {
        editManifest(edit);
        await rejectsNaming('manifest.json', field);
        // The process still serves a correct request.
        const ok = await model.generate({ pixelValues: pixels }, { maxNewTokens: 2 });
        assert.deepEqual(ok.shape, [1, 9]);
      });
    }
    it('bad values in generation_config.json fail the load naming the file and the field, not a later generate()', async () => {
      const file = path.join(broken, 'generation_config.json');
      const config = JSON.parse(fs.readFileSync(file, 'utf8'));
      config.do_sample = 'yes';
      fs.writeFileSync(file, JSON.stringify(config));
      await rejectsNaming('generation_config.json', /'do_sample' is "yes"; expected a boolean/);
      config.do_sample = false;
      config.top_p = 7;
      fs.writeFileSync(file, JSON.stringify(config));
      await rejectsNaming('generation_config.json', /'top_p' is 7; expected a number in \(0, 1\]/);
    });
    it('a manifest whose module path leaves the folder', async () => {
      const manifest = JSON.parse(fs.readFileSync(path.join(broken, 'manifest.json'), 'utf8'));
      manifest.modules.language_model.file = '../language_model.pt';
      fs.writeFileSync(path.join(broken, 'manifest.json'), JSON.stringify(manifest));
      await rejectsNaming('manifest.json', /modules\.language_model\.file is "\.\.\/language_model\.pt"; expected a file name inside the model folder/);
    });
    it('a manifest whose parameters do not belong to the module', async () => {
      const manifest = JSON.parse(fs.readFileSync(path.join(broken, 'manifest.json'), 'utf8'));
      const params = manifest.modules.language_model.parameters;
      const first = Object.keys(params)[0];
      delete params[first];
      fs.writeFileSync(path.join(broken, 'manifest.json'), JSON.stringify(manifest));
      await rejectsNaming('language_model.pt', new RegExp(`parameter '${first.replace(/\./g, '\\.')}' has no weight in the manifest`));
    });
    it('a missing or damaged manifest', async () => {
      fs.writeFileSync(path.join(broken, 'manifest.json'), '{"format": "blip2-node-model", ');
      await rejectsNaming('manifest.json', /is damaged/);
      fs.rmSync(path.join(broken, 'manifest.json'));
      await rejectsNaming('manifest.json', /Hugging Face checkpoint, not a blip2-node model folder/);
    });
    it('a manifest of another format version', async () => {
      const manifest = JSON.parse(fs.readFileSync(path.join(broken, 'manifest.json'), 'utf8'));
      manifest.format_version = 99;
      fs.writeFileSync(path.join(broken, 'manifest.json'), JSON.stringify(manifest));
      await rejectsNaming('manifest.json', /format_version 99/);
    });
    it('a folder that does not exist', async () => {
      await assert.rejects(Blip2ForConditionalGeneration.fromPretrained(path.join(broken, 'nope')), ModelLoadError);
    });
    it('bad load options', async () => {
      await assert.rejects(Blip2ForConditionalGeneration.fromPretrained(broken, { device: 'gpu' }), (e: unknown) => e instanceof InvalidArgumentError && e.argument === 'device');
      await assert.rejects(Blip2ForConditionalGeneration.fromPretrained(broken, { dtype: 'int8' as never }), (e: unknown) => e instanceof InvalidArgumentError && e.argument === 'dtype');
      await assert.rejects(Blip2ForConditionalGeneration.fromPretrained(broken, { attention: 'flash' as never }), (e: unknown) => e instanceof InvalidArgumentError && e.argument === 'attention');
      for (const batchWaitMs of [-1, Number.NaN, '2', 5000]) {
        await assert.rejects(Blip2ForConditionalGeneration.fromPretrained(broken, { batchWaitMs: batchWaitMs as never }),
          (e: unknown) => e instanceof InvalidArgumentError && e.argument === 'batchWaitMs' && /from 0 to 1000/.test(e.message));
      }
      for (const stallBudget of [0, -1, Number.NaN, 65, '2']) {
        await assert.rejects(Blip2ForConditionalGeneration.fromPretrained(broken, { stallBudget: stallBudget as never }),
          (e: unknown) => e instanceof InvalidArgumentError && e.argument === 'stallBudget' && /above 0, at most 64/.test(e.message));
      }
      for (const name of ['encodeBatch', 'encodeLayersPerStep', 'prefillChunk'] as const) {
        for (const value of [0, 1.5, '4']) {
          await assert.rejects(Blip2ForConditionalGeneration.fromPretrained(broken, { [name]: value as never }),
            (e: unknown) => e instanceof InvalidArgumentError && e.argument === name && /an integer >= 1/.test(e.message));
        }
      }
    });
    it("attention 'sdpa' on a module without the switch (an export that predates it) is a ModelLoadError naming the file", async () => {
      const folder = await readModelFolder(broken);
      const { weights, modules } = folder.nativeWeights(['language_model']);
      const file = modules.language_model.path;
      await assert.rejects(ScriptModule.loadWithWeights(file, 'cpu', { weights, dtype: 'float32', parameters: modules.language_model.parameters, fusedAttention: true }),
        (e: unknown) => e instanceof ModelLoadError && e.file === file && /re-export/.test(e.message));
      // Eager asks nothing of the module.
      const lm = await ScriptModule.loadWithWeights(file, 'cpu', { weights, dtype: 'float32', parameters: modules.language_model.parameters });
      lm.dispose();
    });
    it('runs in bfloat16 when asked (a float32 export cast at load)', async () => {
      const bf16 = await Blip2ForConditionalGeneration.fromPretrained(broken, { dtype: 'bfloat16' });
      assert.equal(bf16.dtype, 'bfloat16');
      const out = await bf16.generate({ pixelValues: pixels }, { maxNewTokens: 4 });
      assert.deepEqual(out.shape, [1, 11]);
      bf16.dispose();
      await assert.rejects(bf16.generate({ pixelValues: pixels }), DisposedError);
    });
  });
});
