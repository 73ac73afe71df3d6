import { strict as assert } from 'node:assert';

import { Blip2ForConditionalGeneration, Tensor, stats } from '../lib';
import { expected, fixtureFloats, fixtureTensor, ids, maxAbsDiff, rowsOf } from './support/fixtures';
import { tinyOptModel } from './support/python';

const LOGITS_TOLERANCE = 1e-4; // the bound for forward logits (we measure the actual max below)

function kwargsToOptions(kwargs: Record<string, number | boolean>) {
  return {
    maxNewTokens: kwargs.max_new_tokens as number,
    minNewTokens: kwargs.min_new_tokens as number | undefined,
    numBeams: kwargs.num_beams as number | undefined,
    doSample: kwargs.do_sample as boolean | undefined,
    earlyStopping: kwargs.early_stopping as boolean | undefined,
    lengthPenalty: kwargs.length_penalty as number | undefined,
  };
}

describe('Blip2ForConditionalGeneration (OPT) against transformers 4.45.1 fixtures', () => {
  let model: Blip2ForConditionalGeneration;
  let modelDir: string;
  before(async () => {
    modelDir = tinyOptModel();
    model = await Blip2ForConditionalGeneration.fromPretrained(modelDir);
  });
  after(() => model.dispose());

  it('loads config, generation config and manifest', () => {
    assert.equal(model.config.num_query_tokens, 6);
    assert.equal(model.generationConfig?.eos_token_id, 2);
    assert.equal(model.manifest.architecture, 'opt');
    assert.equal(model.device, 'cpu');
    assert.equal(model.dtype, 'float32');
  });

  describe('forward', () => {
    const worst: Record<string, number> = {};
    after(() => console.log(`      forward logits max |Δ| vs transformers: ${JSON.stringify(worst)}`));

    for (const image of ['gradient', 'noise', 'shapes']) {
      for (const prompt of ['empty', 'question']) {
        it(`logits/${image}/${prompt} within ${LOGITS_TOLERANCE}`, async () => {
          const proc = expected().processor_outputs[`${image}/${prompt}`];
          const { logits } = await model.forward({ pixelValues: fixtureTensor(`pixel_values/${image}`), inputIds: ids(proc.input_ids), attentionMask: ids(proc.attention_mask) });
          const want = fixtureFloats(`logits/${image}/${prompt}`);
          assert.deepEqual(logits.shape, [1, proc.input_ids[0].length, 392]);
          const diff = maxAbsDiff(await logits.toArray(), want);
          worst[`${image}/${prompt}`] = diff;
          assert.ok(diff <= LOGITS_TOLERANCE, `max |Δ| ${diff}`);
        });
      }
    }

    for (const side of ['left', 'right']) {
      it(`batched logits with ${side} padding within ${LOGITS_TOLERANCE}`, async () => {
        const batch = expected().batched_generations.find((b) => b.name === `batch/${side}/greedy_min`)!;
        const pixels = Tensor.from(
          Float32Array.from([...fixtureFloats('pixel_values/gradient'), ...fixtureFloats('pixel_values/noise')]),
          [2, 3, 56, 56],
        );
        const { logits } = await model.forward({ pixelValues: pixels, inputIds: ids(batch.input_ids), attentionMask: ids(batch.attention_mask) });
        const diff = maxAbsDiff(await logits.toArray(), fixtureFloats(`batch/${side}/logits`));
        worst[`batch/${side}`] = diff;
        assert.ok(diff <= LOGITS_TOLERANCE, `max |Δ| ${diff}`);
      });
    }

    it('inputs without <image> tokens get the query embeddings prepended (legacy logits)', async () => {
      const { logits } = await model.forward({ pixelValues: fixtureTensor('pixel_values/gradient'), inputIds: ids([[2, 284, 62, 334, 268, 333, 67, 298, 62]]) });
      assert.deepEqual(logits.shape, [1, 15, 392]);
      const diff = maxAbsDiff(await logits.toArray(), fixtureFloats('legacy/logits/gradient/question'));
      worst['legacy/question'] = diff;
      assert.ok(diff <= LOGITS_TOLERANCE, `max |Δ| ${diff}`);
    });
  });

  describe('generate', () => {
    for (const g of expected().generations) {
      it(`${g.name}: new token ids identical`, async () => {
        const out = await model.generate(
          { pixelValues: fixtureTensor(`pixel_values/${g.image}`), inputIds: ids(g.input_ids), attentionMask: ids(g.attention_mask) },
          { ...kwargsToOptions(g.kwargs), returnDictInGenerate: true },
        );
        const [row] = await rowsOf(out.sequences);
        // Current transformers returns the input ids, then the new ids; 4.45.1 returned BOS + new ids.
        assert.deepEqual(row.slice(0, g.input_ids[0].length), g.input_ids[0]);
        assert.deepEqual(row.slice(g.input_ids[0].length), g.sequences[0].slice(1));
        if (g.sequences_scores) {
          const scores = await out.sequencesScores!.toArray();
          assert.ok(Math.abs(scores[0] - g.sequences_scores[0]) < 1e-5, `sequence score ${scores[0]} vs ${g.sequences_scores[0]}`);
        } else {
          assert.equal(out.sequencesScores, null);
        }
      });
    }

    for (const batch of expected().batched_generations.filter((b) => b.sequences)) {
      it(`${batch.name}: batched greedy identical, and equal to each row alone`, async () => {
        const pixels = Tensor.from(
          Float32Array.from([...fixtureFloats(`pixel_values/${batch.images![0]}`), ...fixtureFloats(`pixel_values/${batch.images![1]}`)]),
          [2, 3, 56, 56],
        );
        const out = await model.generate({ pixelValues: pixels, inputIds: ids(batch.input_ids), attentionMask: ids(batch.attention_mask) }, kwargsToOptions(batch.kwargs!));
        const rows = await rowsOf(out);
        const promptLength = batch.input_ids[0].length;
        for (let r = 0; r < 2; r++) {
          assert.deepEqual(rows[r].slice(0, promptLength), batch.input_ids[r]);
          assert.deepEqual(rows[r].slice(promptLength), batch.sequences![r].slice(1));
          // Alone: drop this row's pads.
          const alone = batch.input_ids[r].filter((_, t) => batch.attention_mask[r][t] === 1);
          const single = await model.generate({ pixelValues: fixtureTensor(`pixel_values/${batch.images![r]}`), inputIds: ids([alone]) }, kwargsToOptions(batch.kwargs!));
          assert.deepEqual((await rowsOf(single))[0].slice(alone.length), rows[r].slice(promptLength));
        }
      });
    }

    it('pixels alone caption from [<image> x 6, BOS], like transformers does for such models', async () => {
      const out = await model.generate({ pixelValues: fixtureTensor('pixel_values/gradient') }, { maxNewTokens: 12 });
      const [row] = await rowsOf(out);
      const greedy = expected().generations.find((g) => g.name === 'gen/greedy/gradient/empty')!;
      assert.deepEqual(row, [380, 380, 380, 380, 380, 380, 2, ...greedy.sequences[0].slice(1)]);
    });

    it('prompts without <image> tokens (pre-4.45 style) get the query embeddings prepended', async () => {
      for (const legacy of expected().legacy_path.filter((g) => g.input_ids)) {
        const out = await model.generate({ pixelValues: fixtureTensor('pixel_values/gradient'), inputIds: ids(legacy.input_ids) }, kwargsToOptions(legacy.kwargs));
        const [row] = await rowsOf(out);
        assert.deepEqual(row.slice(legacy.input_ids[0].length), legacy.sequences[0].slice(1), legacy.name);
      }
    });

    it('allocates no KV cache per call (one per model, at load) and reads only the chosen ids per step', async () => {
      const before = stats();
      const out = await model.generate({ pixelValues: fixtureTensor('pixel_values/noise') }, { maxNewTokens: 12 });
      const after = stats();
      assert.deepEqual(out.shape, [1, 7 + 12]);
      assert.equal(after.kvCacheAllocations - before.kvCacheAllocations, 0);
      // 12 steps x 1 row x one int64 id: nothing else (no logits) crossed to the host.
      assert.equal(after.decodeHostReadBytes - before.decodeHostReadBytes, 12 * 8);
      assert.equal(after.decodeSteps - before.decodeSteps, 11); // the first token comes from the prefill
      // Beam search reads the 2 x numBeams best candidates (score + index) per prompt per step.
      const b0 = stats();
      await model.generate({ pixelValues: fixtureTensor('pixel_values/noise') }, { maxNewTokens: 8, numBeams: 3 });
      const b1 = stats();
      assert.equal(b1.kvCacheAllocations - b0.kvCacheAllocations, 0);
      assert.equal(b1.decodeHostReadBytes - b0.decodeHostReadBytes, 8 * 6 * (4 + 8));
    });
  });
});
